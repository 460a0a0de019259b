"""*decide*: calibrate -> score -> allocate, into a ``Plan``; nothing in the model changes here.

One pass over the calibration windows records each block's statistics and, while the block's
weights are on the device, its channel (and KV-group) scores. Then the coarse step (block
importance -> keep fractions -> widths in multiples) and the fine step (the top-scoring channels
of each block) decide what stays; the attention cuts are chosen from the same pass.

With the refit, the pass also records each block's Gram matrix when the plan is to hold them all
until the surgery (``second_moments``: one pass in all); otherwise ``cfsp.apply`` collects them
in a second pass, one block at a time.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cfsp import allocation
from cfsp.attention import (
    attention_blocks,
    attention_drop_count,
    budget_sparsity,
    choose_dropped_attention,
    choose_kv_groups,
    kv_group_cut,
)
from cfsp.calibration import BlockRun, BlockStep, InMemoryBlocks, run_blocks
from cfsp.compensation import refit_or_mean
from cfsp.config import HOLD_SHARE_OF_WEIGHTS, PruneConfig
from cfsp.errors import CfspError
from cfsp.layouts import ATTENTION, HeadShape
from cfsp.models import block_mlp, check_supported, count_parameters, decoder_blocks, ffn_widths
from cfsp.moe import check_expert_cut, decide_experts, with_expert_budget
from cfsp.plan import Plan
from cfsp.scoring import block_importance, block_scores, kv_group_scores, sublayer_importance
from cfsp.statistics import BlockStats, statistic_steps

log = logging.getLogger("cfsp")
GIB = 2**30


class ScoreBlocks(BlockStep):
    """Channel (and KV-group) scores of each block, taken while its weights are on the device."""

    def __init__(
        self,
        records: list[BlockStats | None],
        config: PruneConfig,
        heads: HeadShape | None,
        keep_head_grams: bool,
    ) -> None:
        self.records, self.config, self.heads, self.keep_head_grams = records, config, heads, keep_head_grams
        self.scores: list[torch.Tensor | None] = [None] * len(records)
        self.group_scores: list[torch.Tensor | None] = [None] * len(records)

    def finish(self, run: BlockRun) -> bool:
        self.score(run.index, run.block)
        return False

    def score(self, index: int, block: nn.Module) -> None:
        stats = self.records[index]
        self.scores[index] = block_scores(block_mlp(block), stats, self.config).cpu()
        if self.heads is not None and stats is not None and stats.heads is not None:
            out = getattr(block, ATTENTION).o_proj.weight
            width = self.heads.group_size * self.heads.head_dim
            self.group_scores[index] = kv_group_scores(
                self.config.attention.kv_group_metric, out, stats.heads, width, self.config.refit_damping
            ).cpu()
            if not self.keep_head_grams:
                stats.heads.drop_second_moments()


def check_model(model: nn.Module, config: PruneConfig, placement: InMemoryBlocks) -> None:
    """What the model must be for this config, checked before any work."""
    check_supported(model)
    check_expert_cut(model, config)
    if not placement.streams and any(p.is_meta for p in model.parameters()):
        raise CfspError(
            "some weights are offloaded (device_map with cpu/disk offload leaves them on the meta device) "
            "and cannot be pruned in place; prune the safetensors directory instead, which streams it "
            "block by block: cfsp prune --model DIR"
        )
    original = ffn_widths(model)
    if config.uniform and len(set(original)) > 1:
        raise CfspError(
            f"--uniform needs blocks of one FFN width, this model's differ ({min(original)}-{max(original)}, "
            "e.g. Gemma 4's double-wide layers); prune it without --uniform"
        )


def gram_bytes(model: nn.Module, heads: HeadShape | None) -> int:
    """What holding every block's Gram matrix takes (packed float32 upper triangles), with
    o_proj's input's where KV groups are cut."""
    blocks = decoder_blocks(model)
    widths = ffn_widths(model)
    if heads is not None:
        widths += [getattr(blocks[i], ATTENTION).o_proj.in_features for i in attention_blocks(blocks)]
    return sum(width * (width + 1) // 2 * 4 for width in widths)


def hold_second_moments(
    model: nn.Module, config: PruneConfig, placement: InMemoryBlocks, heads: HeadShape | None
) -> tuple[bool, str]:
    """Whether the one calibration pass keeps every block's Gram matrix until the surgery (else a
    second pass collects them one block at a time), and why, in words."""
    if config.sequential or config.reconstructs:
        return False, "a second pass re-runs the pruned blocks anyway (sequential or reconstruct)"
    if config.second_moments != "auto":
        return config.second_moments == "hold", f"second_moments={config.second_moments}"
    needed = gram_bytes(model, heads)
    if config.max_memory is not None:
        budget, where = config.max_memory * GIB, f"--max-memory {config.max_memory:g} GiB"
    elif placement.streams:
        return False, "streaming keeps one block in memory"
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        budget, where = weights * HOLD_SHARE_OF_WEIGHTS, "a third of the weights"
    fits = needed <= budget
    return fits, f"the Gram matrices take {needed / GIB:.2f} GiB, {'within' if fits else 'beyond'} {where}"


def decide(
    model: nn.Module,
    calib: torch.Tensor | None,
    config: PruneConfig,
    *,
    placement: InMemoryBlocks,
    stats: list[BlockStats] | None = None,
    progress: bool = True,
    calibration: dict | None = None,
) -> tuple[Plan, list[BlockStats | None]]:
    """The plan for ``model`` under ``config`` (a fixed attention count, not ``auto``), and the
    statistics it was made from (with the Gram matrices if they are held for the surgery).
    ``stats`` reuses an earlier ``calibrate`` of the same dense model."""
    if config.sequential and calib is None:
        raise CfspError("sequential pruning needs calibration windows (pass calib / --calib-source)")
    config = with_expert_budget(config, model)  # a budget on a mixture-of-experts model: whole experts
    check_model(model, config, placement)
    if config.cuts_experts:
        return decide_experts(
            model, calib, config, placement=placement, progress=progress, calibration=calibration
        )
    if config.needs_calibration and calib is None and stats is None:
        raise CfspError(f"method {config.method!r} needs calibration windows (pass calib / --calib-source)")
    blocks = decoder_blocks(model)
    original = ffn_widths(model)
    drop_count = attention_drop_count(model, config)
    heads_after = kv_group_cut(model, config)
    if heads_after is not None and stats is not None:
        raise CfspError("--kv-groups scores heads on its own calibration pass; call prune without stats")
    config = with_budget(config, model, attention_blocks(blocks)[:drop_count], original)  # exact below
    allocation.check_achievable(config, original)
    refits = config.compensation in ("refit", "reconstruct")
    hold, why = hold_second_moments(model, config, placement, heads_after) if refits else (False, "")
    records, scoring = _calibrate_and_score(
        model, calib, config, placement, stats, heads_after, hold, progress
    )
    calibrated = config.needs_calibration
    importance = block_importance(records, config.block_metric) if calibrated else None
    attention_importance, mlp_importance = sublayer_importance(records) if calibrated else (None, None)
    dropped = choose_dropped_attention(blocks, attention_importance, drop_count)
    if config.total_sparsity is not None:
        config = with_budget(config, model, dropped, original)
        log.info(
            f"budget: {config.total_sparsity} of all parameters = {len(dropped)} attention sublayers + FFN "
            f"sparsity {config.sparsity:.4f}"
        )
    kept_groups = _choose_kv_groups(config, heads_after, scoring.group_scores, dropped)
    if dropped:
        log.info(
            f"dropping the attention of blocks {', '.join(map(str, dropped))} (angular importance "
            f"{', '.join(f'{attention_importance[i]:.4f}' for i in dropped)})"
        )
    tokens = [s.tokens for s in records] if calibrated else None
    keep, kept = allocation.allocate(config, scoring.scores, importance, tokens)
    kept = [k if k.numel() else s.argmax().view(1) for k, s in zip(kept, scoring.scores, strict=True)]
    allocation.check_realised(config, [k.numel() for k in kept], original)
    rule, second_moments = _compensation_rule(config, records, kept, why, drop_grams=stats is None)
    plan = Plan(
        # The refit may have fallen back to the mean; reconstruction is recorded as such, from its start.
        config=config if config.reconstructs else config.with_changes(compensation=rule),
        original_widths=original,
        widths=[int(k.numel()) for k in kept],
        kept_channels=kept,
        keep_fractions=[float(f) for f in keep],
        block_importance=importance,
        attention_importance=attention_importance,
        mlp_importance=mlp_importance,
        dropped_attention=dropped,
        kept_kv_groups=kept_groups,
        calibration=calibration if importance is not None else None,
        compensation_rule=rule,
        second_moments=second_moments,
        params_before=count_parameters(model),
    )
    return plan, records


def _calibrate_and_score(
    model: nn.Module,
    calib: torch.Tensor | None,
    config: PruneConfig,
    placement: InMemoryBlocks,
    stats: list[BlockStats] | None,
    heads: HeadShape | None,
    hold: bool,
    progress: bool,
) -> tuple[list[BlockStats | None], ScoreBlocks]:
    """The one calibration pass with the scoring step (or, with ``stats`` given or no calibration
    needed, the scores alone, block by block)."""
    blocks = decoder_blocks(model)
    if stats is None and config.needs_calibration:
        records: list[BlockStats | None] = [BlockStats() for _ in blocks]
        scoring = ScoreBlocks(records, config, heads, keep_head_grams=hold)
        steps = statistic_steps(records, hold, heads is not None, config.needs_window_stats)
        run_blocks(
            model,
            calib,
            [*steps, scoring],
            batch_size=config.batch_size,
            placement=placement,
            progress=progress,
        )
        return records, scoring
    records = stats if config.needs_calibration else [None] * len(blocks)  # Magnitude-SP: weights only
    scoring = ScoreBlocks(records, config, heads, keep_head_grams=True)
    for index, block in enumerate(blocks):
        placement.onload(index)
        scoring.score(index, block)
        placement.offload(index)
    return records, scoring


def _choose_kv_groups(
    config: PruneConfig, heads: HeadShape | None, group_scores: list, dropped: list[int]
) -> list[torch.Tensor | None] | None:
    if heads is None:
        return None
    count = config.attention.kv_groups
    log.info(
        f"removing {count} KV group(s) from each attention sublayer: {heads.heads} heads, "
        f"{heads.kv_heads} KV heads remain"
    )
    return choose_kv_groups([None if i in dropped else g for i, g in enumerate(group_scores)], count)


def _compensation_rule(
    config: PruneConfig,
    records: list[BlockStats | None],
    kept: list[torch.Tensor],
    why: str,
    drop_grams: bool,
) -> tuple[str, str | None]:
    """What the surgery applies (the refit falls back to the mean bias with too few tokens, decided
    before any second moment is collected in a second pass), and where the refit's Gram matrices
    come from: held from the one pass, or a second pass."""
    rule = config.compensation if config.compensation != "reconstruct" else "refit"
    if rule == "refit":
        fallback = "none" if config.uniform else "mean"  # a stock output has no bias to put the mean in
        rule = refit_or_mean(records[0].tokens, max(k.numel() for k in kept), fallback)
    if rule != "refit":
        if drop_grams:
            for record in records:  # the fallback needs no second moments
                if record is not None:
                    record.drop_second_moments()
        return rule, None
    held = all(s is not None and s.has_gram for s in records)
    where = (
        "every block's Gram matrix held from the one calibration pass"
        if held
        else "Gram matrices collected one block at a time in a second pass"
    )
    log.info(f"refit: {where}" + (f" ({why})" if why else ""))
    return rule, "held" if held else "second pass"


def with_budget(config: PruneConfig, model: nn.Module, dropped: list[int], full: list[int]) -> PruneConfig:
    """Budget mode: the config with the FFN sparsity that completes ``total_sparsity`` beside the
    dropped attention sublayers and KV groups, checked against the widths' reach."""
    if config.total_sparsity is None:
        return config
    sparsity = budget_sparsity(model, config.total_sparsity, dropped, config.attention.kv_groups)
    config = config.with_changes(sparsity=sparsity)
    allocation.check_achievable(config, full)
    return config
