"""Saving and loading pruned models.

A pruned directory is an ordinary ``save_pretrained`` directory (safetensors + tokenizer) whose
``config.json`` records the per-block widths (``per_layer_config``) and names a small modeling file
in ``auto_map``, plus ``pruning_plan.json`` with everything the pruning decided. It loads three
ways with identical logits: ``cfsp.load_pruned``, ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` without cfsp, and ``apply_plan`` on the original model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from cfsp import pruned_modeling
from cfsp.errors import CfspError
from cfsp.models import check_supported
from cfsp.pruning import PruneResult
from cfsp.surgery import apply_pruning

PLAN_FILE = "pruning_plan.json"
MODELING_FILE = "modeling_cfsp.py"


def _versions() -> dict[str, str]:
    found = {}
    for package in ("cfsp", "torch", "transformers", "peft", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that replaces ``out_dir`` only if the block succeeds.

    A non-empty ``out_dir`` is refused unless ``overwrite``; on failure nothing is left behind.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CfspError(f"output directory {out} is not empty; choose another path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(trash / "old")
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail before any work if ``out_dir`` would be refused later."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CfspError(f"output directory {out} is not empty; choose another path or pass --overwrite")


def modeling_source(base_class: str) -> str:
    """The standalone modeling file written next to the weights."""
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
) -> Path:
    """Write the pruned ``model`` (and tokenizer) with its plan to ``out_dir``, atomically."""
    plan = result.to_plan() if isinstance(result, PruneResult) else dict(result)
    base_class = type(model).__name__.removeprefix("Cfsp")
    plan["architecture"] = base_class
    plan["versions"] = _versions()
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(modeling_source(base_class), encoding="utf-8")
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["architectures"] = [base_class]
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.Cfsp{base_class}"}
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    return Path(out_dir)


def read_plan(path: str | os.PathLike) -> dict:
    """The ``pruning_plan.json`` of a pruned directory."""
    plan_path = Path(path).expanduser() / PLAN_FILE
    if not plan_path.is_file():
        raise CfspError(f"{path} is not a cfsp pruned directory (no {PLAN_FILE})")
    return json.loads(plan_path.read_text(encoding="utf-8"))


def load_pruned(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a pruned directory as the original model class, narrowed."""
    import transformers

    plan = read_plan(path)
    base = getattr(transformers, plan["architecture"], None)
    if base is None:
        raise CfspError(
            f"model class {plan['architecture']} is not available in transformers {transformers.__version__}"
        )
    model = pruned_modeling.pruned_class(base).from_pretrained(path, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    check_supported(model)
    return model.to(device).eval(), tokenizer


def apply_plan(model: nn.Module, plan: dict | str | os.PathLike) -> nn.Module:
    """Prune an original model exactly as a saved plan says (kept channels and any bias)."""
    if not isinstance(plan, dict):
        plan = read_plan(plan)
    kept = [torch.tensor(k, dtype=torch.long) for k in plan["kept_channels"]]
    biases = plan.get("down_biases")
    if biases is not None:
        biases = [torch.tensor(b, dtype=torch.float64) for b in biases]
    apply_pruning(model, kept, biases)
    return model
