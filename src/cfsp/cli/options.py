"""Command-line options generated from a config dataclass's fields, so that a new option is one field.

Each field becomes ``--field-name`` with the field's help (its choices listed), its default and
its type; a boolean that defaults to False is a plain flag (``--uniform``); a nested config's
fields appear under their flat spelling (``--reconstruct-epochs``); an ``alias`` in a field's
metadata is a second spelling of the flag (``--b`` for ``--weight-activation-exponent``). The
command receives them all as one dict, ``options``, which the config's own constructor checks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer

from cfsp.config import field_default, flat_fields

_TYPES = {"float": float, "int": int, "str": str, "bool": bool}


def _python_type(annotation: str, count_or_word: bool) -> tuple[type, bool]:
    """The option's type from a field's annotation string, and whether it may be left unset."""
    if count_or_word:
        return str, False  # a number or a word (drop_attention: 2, 0.1, auto), read by count_or_word
    if annotation.startswith("tuple[str"):
        return str, False  # a comma-separated list, split by the config
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    if len(names) != 1 or names[0] not in _TYPES:
        raise TypeError(f"no command-line type for a field annotated {annotation!r}")
    return _TYPES[names[0]], optional


def _help(f, default: Any) -> str:
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices:
        text += f" Choices: {', '.join(choices)}."
    return text


def count_or_word(value: str) -> float | str:
    """A number where the flag holds one (2, 0.1), else the word itself (auto), which the config checks."""
    try:
        return float(value)
    except ValueError:
        return value


def generated_parameters(config_class: type, skip: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One keyword parameter, annotated for typer, per option of ``config_class``."""
    skip = set(skip)
    params = []
    for name, f, _nested in flat_fields(config_class):
        if name in skip:
            continue
        default = field_default(f)
        kind, optional = _python_type(str(f.type), bool(f.metadata.get("count_or_word")))
        flag = "--" + (f.metadata.get("flag") or name).replace("_", "-")
        decls = [flag]
        if f.metadata.get("alias"):
            decls.append("--" + f.metadata["alias"].replace("_", "-"))
        if kind is bool and default is False:
            decls = decls[:1]  # a plain flag: --uniform
        if isinstance(default, tuple):
            default = ",".join(default)
        annotation = Annotated[
            kind | None if optional else kind, typer.Option(*decls, help=_help(f, default))
        ]
        value = (
            str(default) if kind is str and default is not None and not isinstance(default, str) else default
        )
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation)
        )
    return params


def with_config_options(config_class: type, skip: Iterable[str] = ()) -> Callable:
    """Give a command every option of ``config_class`` (but ``skip``); the command takes them as
    one keyword, ``options`` (flat names to values, as typed on the command line)."""

    def decorate(command: Callable) -> Callable:
        generated = generated_parameters(config_class, skip)
        names = [p.name for p in generated]
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name != "options"
        ]

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = {name: kwargs.pop(name) for name in names}
            return command(options=options, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + generated)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + generated}
        del wrapper.__wrapped__  # typer must read the new signature, not the command's
        return wrapper

    return decorate
