"""Saving and loading pruned models.

A pruned directory is an ordinary ``save_pretrained`` directory (safetensors + tokenizer) whose
``config.json`` records the per-block widths (``per_layer_config``) and names a small modeling file
in ``auto_map``, plus ``pruning_plan.json`` with everything the pruning decided. It loads three
ways with identical logits: ``cfsp.load_pruned``, ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` without cfsp, and ``apply_plan`` on the original model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from cfsp import layouts, pruned_modeling
from cfsp.errors import CfspError
from cfsp.models import (
    check_supported,
    ffn_widths,
    load_tokenizer,
    loading_errors,
    resolve_device,
    resolve_dtype,
)
from cfsp.outdir import PLAN_FILE, StagedOutput, dumps
from cfsp.pruning import PruneResult
from cfsp.surgery import apply_pruning

MODELING_FILE = "modeling_cfsp.py"
LAYOUTS_FILE = "layouts.py"  # the modeling file's one import besides torch and transformers


def _versions() -> dict[str, str]:
    found = {}
    for package in ("cfsp", "torch", "transformers", "peft", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def modeling_source(base_class: str) -> str:
    """The modeling file written next to the weights (it imports ``layouts.py``, written beside it)."""
    source = Path(pruned_modeling.__file__).read_text(encoding="utf-8")
    footer = (
        "\n\n# The class named in config.json's auto_map.\n"
        "import transformers  # noqa: E402\n\n"
        f"Cfsp{base_class} = pruned_class(transformers.{base_class})\n"
    )
    return source + footer


def save_pruned(
    model: nn.Module,
    tokenizer,
    result: PruneResult | dict,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write the pruned ``model`` (and tokenizer, if any) with its plan to ``out_dir``, atomically.

    ``overwrite`` replaces only an earlier cfsp output; ``protect`` names inputs that ``out_dir``
    must not be (or contain). See ``cfsp.outdir`` for what happens on failure or a signal.
    """
    with StagedOutput(out_dir, overwrite, protect) as folder:
        write_pruned(model, tokenizer, result, folder)
    return Path(out_dir)


def write_pruned(model: nn.Module, tokenizer, result: PruneResult | dict, folder: Path) -> None:
    """The files of a pruned directory, written into an empty ``folder`` (a staging folder)."""
    model.save_pretrained(folder, safe_serialization=True)
    write_pruned_metadata(model, tokenizer, result, folder)


def write_pruned_metadata(model: nn.Module, tokenizer, result: PruneResult | dict, folder: Path) -> None:
    """Everything of a pruned directory but the weights: config, modeling file, plan, tokenizer."""
    plan = result.to_plan() if isinstance(result, PruneResult) else dict(result)
    base_class = type(model).__name__.removeprefix("Cfsp")
    plan["architecture"] = base_class
    plan["versions"] = _versions()
    source = getattr(model.config, "name_or_path", None)
    if source and "source_model" not in plan:
        # the dense model (recover's default distillation teacher; a GGUF export's tokenizer)
        where = Path(str(source)).expanduser()
        plan["source_model"] = str(where.resolve()) if where.exists() else str(source)
    if not (folder / "config.json").is_file():
        model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MODELING_FILE).write_text(modeling_source(base_class), encoding="utf-8")
    (folder / LAYOUTS_FILE).write_text(Path(layouts.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["architectures"] = [base_class]
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.Cfsp{base_class}"}
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / PLAN_FILE).write_text(dumps(plan, indent=1), encoding="utf-8")


def read_plan(path: str | os.PathLike) -> dict:
    """The ``pruning_plan.json`` of a pruned directory, checked for the fields loading needs."""
    plan_path = Path(path).expanduser() / PLAN_FILE
    if not plan_path.is_file():
        raise CfspError(f"{path} is not a cfsp pruned directory (no {PLAN_FILE})")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CfspError(f"{plan_path} is not valid JSON ({exc}); restore it from the original run") from None
    check_plan(plan, plan_path)
    return plan


def check_plan(plan, where: str | os.PathLike = PLAN_FILE) -> None:
    """One line naming the first problem of an invalid or incomplete plan."""

    def bad(problem: str) -> CfspError:
        return CfspError(f"{where}: {problem}; restore the file from the run that wrote it")

    if not isinstance(plan, dict):
        raise bad("expected a JSON object")
    for key, kind in (("architecture", str), ("method", str), ("widths", list), ("kept_channels", list)):
        if not isinstance(plan.get(key), kind):
            raise bad(f"missing or invalid {key!r}")
    widths, kept = plan["widths"], plan["kept_channels"]
    original = plan.get("original_widths", widths)
    if not isinstance(original, list) or not len(widths) == len(kept) == len(original):
        raise bad("widths, original_widths and kept_channels must have one entry per block")
    for block, (width, full, channels) in enumerate(zip(widths, original, kept, strict=True)):
        if not (_is_int(width) and _is_int(full) and 0 < width <= full):
            raise bad(f"block {block}: width {width!r} is not an integer in [1, {full!r}]")
        if not isinstance(channels, list) or len(channels) != width or not all(map(_is_int, channels)):
            raise bad(f"block {block}: kept_channels must be {width} channel indices")
        if channels != sorted(set(channels)) or channels[0] < 0 or channels[-1] >= full:
            raise bad(f"block {block}: kept_channels must be distinct, ascending and below {full}")
    biases = plan.get("down_biases")
    if biases is not None:
        if not isinstance(biases, list) or len(biases) != len(widths):
            raise bad("down_biases must have one entry per block")
        for block, bias in enumerate(biases):
            if not isinstance(bias, list) or not all(_is_finite_number(v) for v in bias):
                raise bad(f"block {block}: down_biases must be finite numbers")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_pruned(
    path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"
):
    """Load ``(model, tokenizer)`` from a pruned directory as the original model class, narrowed.

    The tokenizer is None when the directory holds none (``save_pruned(model, None, ...)``).
    ``device`` and ``dtype`` as in ``load_model``.
    """
    import transformers

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    plan = read_plan(path)
    base = getattr(transformers, plan["architecture"], None)
    if base is None:
        raise CfspError(
            f"model class {plan['architecture']} is not available in transformers {transformers.__version__}"
        )
    with loading_errors(path):
        model = pruned_modeling.pruned_class(base).from_pretrained(path, dtype=dtype)
    check_supported(model)
    if ffn_widths(model) != plan["widths"]:
        raise CfspError(
            f"{path}: config.json and {PLAN_FILE} disagree on the FFN widths; restore both from one run"
        )
    return model.to(device).eval(), load_tokenizer(path)


def apply_plan(model: nn.Module, plan: dict | str | os.PathLike) -> nn.Module:
    """Prune an original model exactly as a saved plan says (kept channels and any bias)."""
    if not isinstance(plan, dict):
        plan = read_plan(plan)
    check_plan(plan)
    if plan.get("options", {}).get("compensation") == "refit":
        raise CfspError(
            "this plan refit down_proj on calibration data, which the plan does not hold; "
            "load the pruned directory itself (cfsp.load_pruned) instead of replaying the plan"
        )
    if ffn_widths(model) != plan.get("original_widths", ffn_widths(model)):
        raise CfspError(
            f"the plan was made for FFN widths {plan['original_widths'][:3]}..., this model has "
            f"{ffn_widths(model)[:3]}...; apply it to the model it was made from"
        )
    kept = [torch.tensor(k, dtype=torch.long) for k in plan["kept_channels"]]
    biases = plan.get("down_biases")
    if biases is not None:
        biases = [torch.tensor(b, dtype=torch.float64) for b in biases]
    apply_pruning(model, kept, biases)
    return model
