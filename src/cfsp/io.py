"""Saving pruned models and replaying their plans (loading them is ``models.load_pruned``).

A pruned directory is an ordinary ``save_pretrained`` directory (safetensors + tokenizer) whose
``config.json`` records the per-block widths (``per_layer_config``) and names a small modeling file
in ``auto_map``, plus ``pruning_plan.json`` with everything the pruning decided. It loads three
ways with identical logits: ``cfsp.load_pruned``, ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` without cfsp, and ``apply_plan`` on the original model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from cfsp import layouts, pruned_modeling
from cfsp.compensation import Compensation
from cfsp.errors import CfspError
from cfsp.models import decoder_blocks, ffn_widths
from cfsp.outdir import PLAN_FILE, StagedOutput, dumps
from cfsp.plan import check_plan, read_plan
from cfsp.pruning import PruneResult
from cfsp.surgery import AttentionCut, apply_pruning

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
    """Everything of a pruned directory but the weights: config, modeling file (not for a uniform
    output, which is the family's stock checkpoint), plan, tokenizer."""
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
    uniform = bool(plan.get("options", {}).get("uniform", False))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["architectures"] = [base_class]
    if not uniform:  # per-block widths need the modeling file; a uniform output is the stock model
        (folder / MODELING_FILE).write_text(modeling_source(base_class), encoding="utf-8")
        (folder / LAYOUTS_FILE).write_text(
            Path(layouts.__file__).read_text(encoding="utf-8"), encoding="utf-8"
        )
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.Cfsp{base_class}"}
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / PLAN_FILE).write_text(dumps(plan, indent=1), encoding="utf-8")


def apply_plan(model: nn.Module, plan: dict | str | os.PathLike) -> nn.Module:
    """Prune an original model exactly as a saved plan says (kept channels and any bias)."""
    if not isinstance(plan, dict):
        plan = read_plan(plan)
    check_plan(plan)
    if plan.get("options", {}).get("compensation") in ("refit", "reconstruct"):
        raise CfspError(
            "this plan refit or trained the MLPs on calibration data, which the plan does not hold; "
            "load the pruned directory itself (cfsp.load_pruned) instead of replaying the plan"
        )
    if ffn_widths(model) != plan.get("original_widths", ffn_widths(model)):
        raise CfspError(
            f"the plan was made for FFN widths {plan['original_widths'][:3]}..., this model has "
            f"{ffn_widths(model)[:3]}...; apply it to the model it was made from"
        )
    kept = [torch.tensor(k, dtype=torch.long) for k in plan["kept_channels"]]
    biases = plan.get("down_biases")

    def plan_bias(index: int, _block: nn.Module) -> Compensation:
        return Compensation(bias=torch.tensor(biases[index], dtype=torch.float64) if biases else None)

    uniform = bool(plan.get("options", {}).get("uniform", False))
    apply_pruning(
        model,
        kept,
        plan_bias,
        compensated=biases is not None,
        uniform=uniform,
        attention=_plan_attention_cut(model, plan),
    )
    return model


def _plan_attention_cut(model: nn.Module, plan: dict) -> AttentionCut:
    """The plan's dropped attention sublayers and kept KV groups, with the head counts they leave."""
    cut = AttentionCut(dropped=plan.get("dropped_attention", []))
    groups = plan.get("kept_kv_groups")
    if groups is None:
        return cut
    cut.kept_groups = [None if g is None else torch.tensor(g, dtype=torch.long) for g in groups]
    index, kept = next((i, g) for i, g in enumerate(groups) if g is not None)
    shape = layouts.head_shape(getattr(decoder_blocks(model)[index], layouts.ATTENTION))
    if shape is None or max(kept) >= shape.kv_heads:
        raise CfspError(
            "the plan keeps KV groups this model does not have; apply it to the model it was made from"
        )
    cut.heads = shape.keeping(len(kept))
    return cut
