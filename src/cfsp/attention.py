"""Attention sublayers: how many to drop, which ones, and the parameter budget they share with the
FFN channels.

A block's attention sublayer is dropped whole (its block keeps the MLP): ``drop_attention`` is a
count, a share of the blocks with attention, or ``"auto"``, which tries a few counts under a
``total_sparsity`` budget and keeps the one with the lowest loss on held-out calibration windows.
The surgery itself is ``layouts.drop_attention``.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace

import torch
from torch import nn

from cfsp import layouts
from cfsp.config import PruneConfig
from cfsp.errors import CfspError
from cfsp.models import block_mlp, count_parameters, decoder_blocks

log = logging.getLogger("cfsp")

SEARCH_HOLDOUT = 0.125  # share of the calibration windows the automatic count is judged on


def attention_blocks(blocks: nn.ModuleList) -> list[int]:
    """The blocks with an attention sublayer that can be dropped."""
    return [i for i, block in enumerate(blocks) if layouts.has_attention(block)]


def attention_drop_count(model: nn.Module, config: PruneConfig) -> int:
    """How many attention sublayers ``config.drop_attention`` removes from this model (a count, or a
    share of its blocks with attention), checked before any work."""
    if not config.drop_attention:
        return 0
    eligible = len(attention_blocks(decoder_blocks(model)))
    value = config.drop_attention
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


def budget_sparsity(model: nn.Module, total: float, dropped: list[int]) -> float:
    """The FFN sparsity that, beside the dropped attention sublayers, removes ``total`` of all
    parameters.

    Every FFN channel of a block costs the same number of parameters (a row of each input
    projection and a column of the down projection) and blocks share the hidden size, so the FFN's
    share of the removal is spread over its channels; rounding widths to the multiple moves it
    by at most one multiple overall.
    """
    blocks = decoder_blocks(model)
    attention = sum(count_parameters(getattr(blocks[i], layouts.ATTENTION)) for i in dropped)
    ffn = sum(count_parameters(block_mlp(block)) for block in blocks)
    everything = count_parameters(model)
    sparsity = (total * everything - attention) / ffn
    if not 0.0 < sparsity < 1.0:
        reach = f"{attention / everything:.3f}" if sparsity <= 0 else f"{(attention + ffn) / everything:.3f}"
        side = "at or above" if sparsity <= 0 else "below"
        raise CfspError(
            f"--total-sparsity {total}: the dropped attention sublayers alone remove {reach} of the "
            f"parameters, {side} the target; "
            + ("drop fewer attention sublayers or raise the target" if sparsity <= 0 else "lower the target")
        )
    return float(sparsity)


def search_candidates(eligible: int) -> list[int]:
    """The counts ``"auto"`` tries: none, then powers of two up to a quarter of the attention sublayers."""
    counts, count = [0], 1
    while count <= max(1, eligible // 4) and count < eligible:
        counts.append(count)
        count *= 2
    return counts


def search_drop_count(model: nn.Module, calib: torch.Tensor, config: PruneConfig) -> tuple[int, list[dict]]:
    """``drop_attention="auto"``: the count whose pruned model has the lowest loss.

    Each candidate count prunes a copy of the model with the whole pipeline (the same budget, so
    every attention sublayer dropped leaves more FFN channels) on the calibration windows less a
    held-out share, and is judged by next-token loss on that share. Costs one pruning per
    candidate and a copy of the model in memory.
    """
    from cfsp.pruning import prune

    eligible = len(attention_blocks(decoder_blocks(model)))
    held = max(1, math.ceil(len(calib) * SEARCH_HOLDOUT))
    if len(calib) - held < 1:
        raise CfspError("--drop-attention auto holds out calibration windows: give at least 2 (--nsamples)")
    train, heldout = calib[:-held], calib[-held:]
    trials = []
    for count in search_candidates(eligible):
        trial = copy.deepcopy(model)
        result = prune(trial, train, replace(config, drop_attention=count), progress=False)
        loss = heldout_loss(trial, heldout, config.batch_size)
        trials.append(dict(drop_attention=count, heldout_loss=loss, dropped=result.dropped_attention))
        log.info(f"--drop-attention auto: {count} sublayers -> held-out loss {loss:.4f}")
        del trial
    best = min(trials, key=lambda t: (t["heldout_loss"], t["drop_attention"]))
    return best["drop_attention"], trials


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of ``model`` on ``windows``."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    return total / count
