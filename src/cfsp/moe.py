"""The expert cut of a mixture-of-experts model: *decide* which routed experts stay, *apply* it.

Coarse to fine, as for FFN channels: the coarse step says how many experts each MoE block keeps
(the same count everywhere, because every engine's config holds one ``num_experts``, so the output
stays the family's stock checkpoint); the fine step says which, by an expert score
(``cfsp.scoring.EXPERT_METRICS``) of the routing statistics that the one calibration pass records
(``cfsp.statistics.ExpertRouting``). With group-limited routing every group loses the same number
of experts, so the group structure (``n_group`` contiguous groups) holds in the pruned router.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cfsp.calibration import InMemoryBlocks, run_blocks
from cfsp.config import PruneConfig
from cfsp.errors import CfspError
from cfsp.experts import check_expert_count, choose_experts, keep_experts, moe_blocks, set_expert_count
from cfsp.models import active_parameters, count_parameters, decoder_blocks, ffn_widths
from cfsp.plan import Plan
from cfsp.scoring import block_importance, expert_scores, sublayer_importance
from cfsp.statistics import BlockMovement, BlockStats, ExpertRouting

log = logging.getLogger("cfsp")


def kept_count(count: int, expert_sparsity: float) -> int:
    """Experts a block of ``count`` keeps: the removed share rounded to the nearest whole expert."""
    return count - int(round(count * expert_sparsity))


def check_expert_cut(model: nn.Module, config: PruneConfig) -> None:
    """What the expert cut needs of the model and the other options, checked before any work."""
    moes = moe_blocks(decoder_blocks(model))
    if not any(m is not None for m in moes):
        if config.expert_sparsity:
            raise CfspError(
                "--expert-sparsity removes routed experts, and this model has none (a dense model); use --sparsity"
            )
        return
    if not config.expert_sparsity:
        raise CfspError(
            "this is a mixture-of-experts model: give --expert-sparsity (e.g. 0.25 removes a quarter of "
            "every MoE block's routed experts)"
        )
    others = [
        flag
        for flag, on in (
            ("--sparsity", config.sparsity),
            ("--total-sparsity", config.total_sparsity is not None),
            ("--sequential", config.sequential),
            *((flag, True) for flag in config.attention.cuts),
        )
        if on
    ]
    if others:
        raise CfspError(
            f"on a mixture-of-experts model, --expert-sparsity cannot be combined with {', '.join(others)} "
            "yet; prune the routed experts alone"
        )
    for index, moe in enumerate(moes):
        if moe is not None:
            check_expert_count(moe, kept_count(moe.count, config.expert_sparsity), f"block {index}")


def decide_experts(
    model: nn.Module,
    calib: torch.Tensor | None,
    config: PruneConfig,
    *,
    placement: InMemoryBlocks,
    progress: bool = True,
    calibration: dict | None = None,
) -> tuple[Plan, list[BlockStats]]:
    """The one calibration pass (block movement and routing statistics), the expert scores, and
    the experts each MoE block keeps."""
    if calib is None:
        raise CfspError(
            "--expert-sparsity scores experts on calibration windows (pass calib / --calib-source)"
        )
    blocks = decoder_blocks(model)
    moes = moe_blocks(blocks)
    records = [BlockStats() for _ in blocks]
    run_blocks(
        model,
        calib,
        [BlockMovement(records), ExpertRouting(records)],
        batch_size=config.batch_size,
        placement=placement,
        progress=progress,
        description="routing statistics",
    )
    kept: list[torch.Tensor | None] = []
    scores: list[list[float] | None] = []
    unrouted: list[int | None] = []
    for index, (moe, record) in enumerate(zip(moes, records, strict=True)):
        if moe is None:
            kept.append(None), scores.append(None), unrouted.append(None)
            continue
        score = expert_scores(config.expert_metric, record.experts, index).cpu()
        kept.append(choose_experts(score, kept_count(moe.count, config.expert_sparsity), moe.groups))
        scores.append(score.tolist())
        unrouted.append(record.experts.unrouted)
    never = sum(u for u in unrouted if u)
    if never:
        log.warning(
            f"{never} routed expert(s) received no calibration token (scored lowest); more or more varied "
            "calibration windows would rank them"
        )
    widths = ffn_widths(model)
    attention_importance, mlp_importance = sublayer_importance(records)
    plan = Plan(
        config=config,
        original_widths=widths,
        widths=list(widths),
        kept_channels=[torch.arange(w) for w in widths],
        keep_fractions=[1.0] * len(widths),
        block_importance=block_importance(records, config.block_metric),
        attention_importance=attention_importance,
        mlp_importance=mlp_importance,
        calibration=calibration,
        compensation_rule="none",
        original_experts=[None if m is None else m.count for m in moes],
        kept_experts=kept,
        expert_scores=scores,
        unrouted_experts=unrouted,
        params_before=count_parameters(model),
        active_params_before=active_parameters(model),
    )
    return plan, records


def apply_experts(model: nn.Module, plan: Plan, placement: InMemoryBlocks | None = None) -> Plan:
    """Remove the routed experts the plan does not keep, block by block, and write the new count
    into the config."""
    placement = placement or InMemoryBlocks()
    blocks = decoder_blocks(model)
    moes = moe_blocks(blocks)
    if [None if m is None else m.count for m in moes] != plan.original_experts:
        raise CfspError(
            "the plan was made for a model with other routed-expert counts; apply it to the model it was made from"
        )
    placement.begin_output()
    counts = set()
    for index, kept in enumerate(plan.kept_experts):  # every block: a streamed output writes each
        placement.onload(index)
        if kept is not None:
            moe = moe_blocks([blocks[index]])[0]  # after onload: the block's own (streamed) tensors
            check_expert_count(moe, int(kept.numel()), f"block {index}")
            keep_experts(moe, kept)
            counts.add(int(kept.numel()))
        placement.offload(index)
    if len(counts) != 1:
        raise CfspError(
            "every mixture-of-experts block must keep the same number of experts (one config count)"
        )
    original = next(n for n in plan.original_experts if n is not None)
    set_expert_count(model.config, original, counts.pop())
    plan.params_after = count_parameters(model)
    plan.active_params_after = active_parameters(model)
    log.info(
        f"kept {plan.experts_after} of {plan.experts_before} routed experts; parameters "
        f"{plan.params_before:,} -> {plan.params_after:,}, active per token {plan.active_params_before:,} -> "
        f"{plan.active_params_after:,}"
    )
    return plan
