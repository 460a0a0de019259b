"""What recovery trains: LoRA adapters with per-block ranks (merged afterwards), or the MLP weights."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from cfsp import models
from cfsp.errors import CfspError
from cfsp.recovery.config import RecoveryConfig
from cfsp.recovery.ranks import block_targets, decoder_blocks


def build_lora_config(model: nn.Module, ranks: Sequence[int], config: RecoveryConfig):
    """A peft ``LoraConfig`` giving block ``i`` rank ``ranks[i]`` and alpha ``alpha * ranks[i] / R``.

    Targets are the ``nn.Linear`` modules of the decoder blocks named as targets (the modules
    ``rank_unit_costs`` counts, so the parameter count matches exactly): embeddings, the LM head and
    the stacked tensors of routed experts never get adapters.
    """
    from peft import LoraConfig

    prefix, blocks = decoder_blocks(model)
    if len(ranks) != len(blocks):
        raise CfspError(f"got {len(ranks)} ranks for {len(blocks)} decoder blocks")
    target = [
        f"{prefix}.{index}.{name}"
        for index, block in enumerate(blocks)
        for name in block_targets(block, config.target_modules)
    ]
    block_key = [rf"{re.escape(f'{prefix}.{i}.')}.*" for i in range(len(blocks))]
    scale = config.lora_alpha / config.rank
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=target,
        rank_pattern={key: int(r) for key, r in zip(block_key, ranks, strict=True)},
        alpha_pattern={key: scale * int(r) for key, r in zip(block_key, ranks, strict=True)},
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, ranks: Sequence[int], config: RecoveryConfig):
    """Wrap ``model`` (in place) in a peft model with per-block ranks; only LoRA weights train."""
    from peft import get_peft_model

    return get_peft_model(model, build_lora_config(model, ranks, config))


def train_block_weights(model: nn.Module, which: str = "mlp") -> dict[str, Any]:
    """Freeze everything but the weights (and biases) that train: ``mlp``, the MLPs of the decoder
    blocks, exactly the part pruning changed; ``all``, every block weight (embeddings and output
    head stay frozen: they are the largest matrices and pruning did not touch them). Returns the
    budget record ``recover`` reports."""
    if which not in ("mlp", "all"):
        raise CfspError(f"unknown --train {which!r} for block weights; use mlp or all")
    model.requires_grad_(False)
    for block in models.decoder_blocks(model):
        (models.block_mlp(block) if which == "mlp" else block).requires_grad_(True)
    return {"train": which, "trainable_params": count_trainable(model)}


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the weights and return the plain model (same class, widths, biases)."""
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval()
