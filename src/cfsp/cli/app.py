"""The command line's shared plumbing: the app, consoles, common options, one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cfsp.errors import CfspError, PeerFailed, Terminated

app = typer.Typer(
    help="Structured FFN pruning for LLMs (CFSP and baselines), evaluation, benchmarks and recovery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

DeviceOption = Annotated[str, typer.Option(help="auto (the first GPU if any), cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[
    str, typer.Option(help="auto (bfloat16 on a GPU, float32 on CPU), float32 or bfloat16.")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an earlier cfsp output directory.")
]


class _ConsoleHandler(logging.Handler):
    """cfsp's warnings and notes, one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        errors.print(
            f"{record.levelname.lower()}: {record.getMessage()}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


@app.callback()
def _root() -> None:
    """Structured FFN pruning for LLMs (CFSP and baselines), evaluation, benchmarks and recovery."""
    logger = logging.getLogger("cfsp")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        # Under torchrun every process runs the command; rank 0 alone speaks, others only of errors.
        logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR)


def _fail(message: str, code: int) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def friendly_errors(command):
    """Bad input: one ``error:`` line on stderr and exit code 2, never a traceback.

    Ctrl-C and SIGTERM / SIGHUP also end with one line (exit 130 / 128 + signal); the output
    reservation has already removed whatever the run had written.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PeerFailed:
            raise typer.Exit(2) from None  # the process that failed has said why
        except CfspError as exc:
            raise _fail(str(exc), 2) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; nothing was written", 130) from None
        except Terminated as exc:
            name = signal.Signals(exc.signum).name
            raise _fail(f"stopped by {name}; nothing was written", 128 + exc.signum) from None

    return wrapper


def option_help(name: str) -> str:
    from cfsp.config import option_help as config_help

    return config_help(name)


def parse_csv(option: str, value: str, cast=str) -> list:
    """A comma-separated option; an empty list or an item of the wrong type is one line."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise CfspError(f"--{option} is empty; give a comma-separated list, e.g. 1,4")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise CfspError(
            f"--{option} must be a comma-separated list of {cast.__name__}s, got {value!r}"
        ) from None


def write_json(path: Path | None, payload: dict) -> None:
    from cfsp.outdir import dumps, write_text_atomic

    if path is None:
        return
    write_text_atomic(path, dumps(payload))
    console.print(f"wrote [bold]{path}[/]")
