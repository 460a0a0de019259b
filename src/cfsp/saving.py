"""Saving pruned models and replaying their plans (loading them is ``models.load_pruned``).

A pruned directory is an ordinary ``save_pretrained`` directory (safetensors + tokenizer) whose
``config.json`` records the per-block widths (``per_layer_config``) and names a small modeling file
in ``auto_map``, plus ``pruning_plan.json`` with everything the pruning decided. It loads three
ways with identical logits: ``cfsp.load_pruned``, ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` without cfsp, and ``apply_plan`` on the original model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from torch import nn

from cfsp import layouts, pruned_modeling
from cfsp.apply import apply
from cfsp.errors import CfspError
from cfsp.models import ffn_widths
from cfsp.outdir import PLAN_FILE, StagedOutput, dumps
from cfsp.plan import Plan

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
    result: Plan | dict,
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


def write_pruned(model: nn.Module, tokenizer, result: Plan | dict, folder: Path) -> None:
    """The files of a pruned directory, written into an empty ``folder`` (a staging folder)."""
    model.save_pretrained(folder, safe_serialization=True)
    write_pruned_metadata(model, tokenizer, result, folder)


def write_pruned_metadata(model: nn.Module, tokenizer, result: Plan | dict, folder: Path) -> None:
    """Everything of a pruned directory but the weights: config, modeling file (not for a uniform
    output, which is the family's stock checkpoint), plan, tokenizer."""
    plan = result.to_dict() if isinstance(result, Plan) else dict(result)
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
    stock = result.stock_output if isinstance(result, Plan) else Plan.from_dict(plan).stock_output
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["architectures"] = [base_class]
    if not stock:  # per-block widths need the modeling file; a uniform output is the stock model
        (folder / MODELING_FILE).write_text(modeling_source(base_class), encoding="utf-8")
        (folder / LAYOUTS_FILE).write_text(
            Path(layouts.__file__).read_text(encoding="utf-8"), encoding="utf-8"
        )
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.Cfsp{base_class}"}
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / PLAN_FILE).write_text(dumps(plan, indent=1), encoding="utf-8")


def apply_plan(model: nn.Module, plan: Plan | dict | str | os.PathLike) -> nn.Module:
    """Prune an original model exactly as a saved plan says (kept channels and any bias)."""
    if isinstance(plan, dict):
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if plan.kept_experts is not None:  # routed experts removed, nothing computed from calibration data
        apply(model, copy.copy(plan), progress=False)
        return model
    if plan.config.compensation in ("refit", "reconstruct"):
        raise CfspError(
            "this plan refit or trained the MLPs on calibration data, which the plan does not hold; "
            "load the pruned directory itself (cfsp.load_pruned) instead of replaying the plan"
        )
    if ffn_widths(model) != plan.original_widths:
        raise CfspError(
            f"the plan was made for FFN widths {plan.original_widths[:3]}..., this model has "
            f"{ffn_widths(model)[:3]}...; apply it to the model it was made from"
        )
    replay = copy.copy(plan)
    replay.compensation_rule = "plan"  # the plan's own biases, nothing computed again
    apply(model, replay, progress=False)
    return model
