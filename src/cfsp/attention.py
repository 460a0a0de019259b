"""Attention sublayers: how many to drop, which ones, which KV groups the others lose, and the
parameter budget all of it shares with the FFN channels.

A block's attention sublayer is dropped whole (its block keeps the MLP): ``drop_attention`` is a
count, a share of the blocks with attention, or ``"auto"`` (``cfsp.search``), which tries a few
counts under a ``total_sparsity`` budget and keeps the one with the lowest loss on held-out
calibration windows.
``kv_groups`` removes that many KV groups (a KV head and the query heads that read it) from every
attention sublayer that stays, the lowest-scoring ones of each (``scoring.kv_group_scores``); one
count for every sublayer keeps the config's single pair of head counts, which every engine reads.
The surgery itself is ``layouts.drop_attention`` and ``surgery.slice_kv_groups``.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from cfsp import layouts
from cfsp.config import PruneConfig
from cfsp.errors import CfspError
from cfsp.models import block_mlp, count_parameters, decoder_blocks

log = logging.getLogger("cfsp")


def attention_blocks(blocks: nn.ModuleList) -> list[int]:
    """The blocks with an attention sublayer that can be dropped."""
    return [i for i, block in enumerate(blocks) if layouts.has_attention(block)]


def attention_drop_count(model: nn.Module, config: PruneConfig) -> int:
    """How many attention sublayers ``config.drop_attention`` removes from this model (a count, or a
    share of its blocks with attention), checked before any work."""
    value = config.attention.drop_attention
    if not value:
        return 0
    eligible = len(attention_blocks(decoder_blocks(model)))
    count = int(value) if value >= 1 else round(value * eligible)
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    if getattr(text_config, "num_kv_shared_layers", 0):
        raise CfspError(
            "this model's later blocks reuse the KV cache of earlier ones (num_kv_shared_layers), so an "
            "attention sublayer cannot be dropped on its own; prune it without --drop-attention"
        )
    if count >= eligible:
        raise CfspError(
            f"--drop-attention {value} would remove {count} of the {eligible} attention sublayers; keep at "
            f"least one (a count below {eligible}, or a share below 1)"
        )
    if count == 0:
        log.warning(f"--drop-attention {value} of {eligible} attention sublayers rounds to none")
    return count


def choose_dropped_attention(blocks: nn.ModuleList, importance: list[float] | None, count: int) -> list[int]:
    """The ``count`` blocks with attention whose attention sublayer turns the residual stream least."""
    if count == 0:
        return []
    return sorted(sorted(attention_blocks(blocks), key=lambda i: (importance[i], i))[:count])


def kv_group_cut(model: nn.Module, config: PruneConfig) -> layouts.HeadShape | None:
    """The head shape every kept attention sublayer is cut to by ``config.kv_groups`` (None: no
    cut), checked before any work."""
    count = config.attention.kv_groups
    if not count:
        return None
    blocks = decoder_blocks(model)
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    if getattr(text_config, "num_kv_shared_layers", 0):
        raise CfspError(
            "this model's later blocks reuse the KV cache of earlier ones (num_kv_shared_layers); prune it "
            "without --kv-groups"
        )
    shapes = {layouts.head_shape(getattr(blocks[i], layouts.ATTENTION)) for i in attention_blocks(blocks)}
    if None in shapes or len(shapes) != 1:
        problem = "fused or jointly normalised projections" if None in shapes else "different head shapes"
        raise CfspError(
            f"--kv-groups needs attention sublayers with separate q/k/v/o projections and one head shape; "
            f"this model's have {problem}; prune it without --kv-groups"
        )
    shape = shapes.pop()
    stated = (
        getattr(text_config, "num_attention_heads", None),
        getattr(text_config, "num_key_value_heads", None),
    )
    if stated[0] != shape.heads or stated[1] not in (None, shape.kv_heads):
        raise CfspError(
            f"the config states {stated[0]} heads / {stated[1]} KV heads but the attention has "
            f"{shape.heads} / {shape.kv_heads}; prune it without --kv-groups"
        )
    if count >= shape.kv_heads:
        raise CfspError(
            f"--kv-groups {count}: each attention sublayer has {shape.kv_heads} KV group(s) and must keep one; "
            + (
                f"give a count below {shape.kv_heads}"
                if shape.kv_heads > 1
                else "prune it without --kv-groups"
            )
        )
    after = shape.keeping(shape.kv_heads - count)
    refusal = _family_refusal(model, after)
    if refusal is not None:
        accepted = [
            str(n)
            for n in range(1, shape.kv_heads)
            if _family_refusal(model, shape.keeping(shape.kv_heads - n)) is None
        ]
        raise CfspError(
            f"--kv-groups {count} leaves {after.heads} attention heads, which {type(model).__name__} refuses "
            f"({refusal}); "
            + (f"use --kv-groups {' or '.join(accepted)}" if accepted else "prune it without --kv-groups")
        )
    return after


def _family_refusal(model: nn.Module, shape: layouts.HeadShape) -> str | None:
    """Why the family's config class or model class refuses these head counts (None: it takes
    them). Some insist that the hidden size be a multiple of the head count even with the head size
    given. The model is built on the meta device, so the check allocates nothing."""
    changed = copy.deepcopy(model.config)
    layouts.set_head_counts(changed, shape)
    try:
        loaded = type(changed).from_dict(changed.to_dict())
        with torch.device("meta"):
            type(model)(layouts.homogeneous_config(loaded))
    except Exception as exc:  # noqa: BLE001 - the validators raise their own error types
        cause = exc.__cause__ or exc
        return str(cause).strip().splitlines()[-1].strip()
    return None


def choose_kv_groups(scores: list[torch.Tensor | None], count: int) -> list[torch.Tensor | None]:
    """Per block, the KV groups kept (ascending): all but the ``count`` lowest-scoring ones
    (None where the block keeps no attention sublayer to cut)."""
    kept = []
    for score in scores:
        if score is None:
            kept.append(None)
            continue
        order = torch.argsort(score.cpu(), descending=True, stable=True)
        kept.append(torch.sort(order[: score.numel() - count]).values)
    return kept


def kv_group_parameters(attention: nn.Module, count: int) -> int:
    """Parameters that removing ``count`` KV groups takes out of one attention sublayer: their rows
    of q/k/v_proj (with biases) and columns of o_proj."""
    shape = layouts.head_shape(attention)
    per_group = sum(
        p.numel() for name in ("q_proj", "k_proj", "v_proj") for p in getattr(attention, name).parameters()
    )
    per_group += attention.o_proj.weight.numel()
    return count * per_group // shape.kv_heads


def budget_sparsity(model: nn.Module, total: float, dropped: list[int], kv_groups: int = 0) -> float:
    """The FFN sparsity that, beside the dropped attention sublayers and the KV groups removed from
    the others, removes ``total`` of all parameters.

    Every FFN channel of a block costs the same number of parameters (a row of each input
    projection and a column of the down projection) and blocks share the hidden size, so the FFN's
    share of the removal is spread over its channels; rounding widths to the multiple moves it
    by at most one multiple overall.
    """
    blocks = decoder_blocks(model)
    attention = sum(count_parameters(getattr(blocks[i], layouts.ATTENTION)) for i in dropped)
    if kv_groups:
        attention += sum(
            kv_group_parameters(getattr(blocks[i], layouts.ATTENTION), kv_groups)
            for i in attention_blocks(blocks)
            if i not in dropped
        )
    ffn = sum(count_parameters(block_mlp(block)) for block in blocks)
    everything = count_parameters(model)
    sparsity = (total * everything - attention) / ffn
    if not 0.0 < sparsity < 1.0:
        reach = f"{attention / everything:.3f}" if sparsity <= 0 else f"{(attention + ffn) / everything:.3f}"
        side = "at or above" if sparsity <= 0 else "below"
        raise CfspError(
            f"--total-sparsity {total}: the attention cuts alone remove {reach} of the parameters, {side} "
            "the target; "
            + (
                "drop fewer attention sublayers or KV groups, or raise the target"
                if sparsity <= 0
                else "lower the target"
            )
        )
    return float(sparsity)
