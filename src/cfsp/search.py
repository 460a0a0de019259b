"""Searches over the whole pipeline: an option whose best value is found by pruning copies of the
model with each candidate and comparing their loss on held-out calibration windows.

``drop_attention="auto"`` is one: under a ``total_sparsity`` budget, every attention sublayer dropped
leaves more FFN channels, and which split is best depends on the model. The search sits above
*decide* and *apply* and below ``prune``.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from cfsp.apply import apply
from cfsp.attention import attention_blocks
from cfsp.calibration import InMemoryBlocks
from cfsp.config import PruneConfig
from cfsp.decide import decide
from cfsp.errors import CfspError
from cfsp.evaluation.perplexity import window_nll
from cfsp.models import decoder_blocks

log = logging.getLogger("cfsp")
SEARCH_HOLDOUT = 0.125  # share of the calibration windows a searched option is judged on


def search_candidates(eligible: int) -> list[int]:
    """The counts ``"auto"`` tries: none, then powers of two up to a quarter of the attention sublayers."""
    counts, count = [0], 1
    while count <= max(1, eligible // 4) and count < eligible:
        counts.append(count)
        count *= 2
    return counts


def heldout_split(calib: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows to prune with, and the held-out ones to judge by."""
    held = max(1, math.ceil(len(calib) * SEARCH_HOLDOUT))
    if len(calib) - held < 1:
        raise CfspError(f"{what} holds out calibration windows: give at least 2 (--nsamples)")
    return calib[:-held], calib[-held:]


def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of ``model`` on ``windows``."""
    with torch.no_grad():
        total, count = window_nll(model, windows, batch_size)
    return total / count


def search_drop_count(model: nn.Module, calib: torch.Tensor, config: PruneConfig) -> tuple[int, list[dict]]:
    """``drop_attention="auto"``: the count whose pruned model has the lowest held-out loss.

    Each candidate count prunes a copy of the model with the whole pipeline (the same budget, so
    every attention sublayer dropped leaves more FFN channels) on the calibration windows less a
    held-out share, and is judged by next-token loss on that share. Costs one pruning per
    candidate and a copy of the model in memory.
    """
    eligible = len(attention_blocks(decoder_blocks(model)))
    train, heldout = heldout_split(calib, "--drop-attention auto")
    trials = []
    for count in search_candidates(eligible):
        trial = copy.deepcopy(model)
        trial_config = config.with_changes(drop_attention=count)
        plan, records = decide(trial, train, trial_config, placement=InMemoryBlocks(), progress=False)
        apply(trial, plan, stats=records, calib=train, progress=False)
        loss = heldout_loss(trial, heldout, config.batch_size)
        trials.append(dict(drop_attention=count, heldout_loss=loss, dropped=plan.dropped_attention))
        log.info(f"--drop-attention auto: {count} sublayers -> held-out loss {loss:.4f}")
        del trial, records
    best = min(trials, key=lambda t: (t["heldout_loss"], t["drop_attention"]))
    return best["drop_attention"], trials
