"""The expert cut of a mixture-of-experts model: *decide* which routed experts stay, *apply* it.

Coarse to fine, as for FFN channels: the coarse step says how many experts each MoE block keeps
(the same count everywhere, because every engine's config holds one ``num_experts``, so the output
stays the family's stock checkpoint); the fine step says which, by an expert score
(``cfsp.scoring.EXPERT_METRICS``) of the routing statistics that the one calibration pass records
(``cfsp.statistics.ExpertRouting``). With group-limited routing every group loses the same number
of experts, so the group structure (``n_group`` contiguous groups) holds in the pruned router.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from cfsp.calibration import InMemoryBlocks, run_blocks
from cfsp.config import PruneConfig
from cfsp.errors import CfspError
from cfsp.experts import (
    check_expert_count,
    choose_experts,
    keep_expert_channels,
    keep_experts,
    moe_blocks,
    set_expert_count,
    set_expert_width,
)
from cfsp.layouts import decoder_layers
from cfsp.models import active_parameters, count_parameters, decoder_blocks, ffn_widths
from cfsp.plan import Plan
from cfsp.scoring import block_importance, expert_channel_scores, expert_scores, sublayer_importance
from cfsp.statistics import BlockMovement, BlockStats, ExpertRouting

log = logging.getLogger("cfsp")


def kept_count(count: int, sparsity: float) -> int:
    """Experts (or channels) a block of ``count`` keeps: the removed share rounded to a whole one."""
    return max(1, count - int(round(count * sparsity)))


def check_expert_cut(model: nn.Module, config: PruneConfig) -> None:
    """What the expert cut needs of the model and the other options, checked before any work."""
    moes = moe_blocks(decoder_blocks(model))
    if not any(m is not None for m in moes):
        if config.cuts_experts:
            raise CfspError(
                "--expert-sparsity and --expert-channel-sparsity prune routed experts, and this model has none "
                "(a dense model); use --sparsity"
            )
        return
    if not config.cuts_experts:
        raise CfspError(
            "this is a mixture-of-experts model: give --expert-sparsity (e.g. 0.25 removes a quarter of "
            "every MoE block's routed experts) or --expert-channel-sparsity"
        )
    others = [
        flag
        for flag, on in (
            ("--sparsity", config.sparsity),
            ("--sequential", config.sequential),
            *((flag, True) for flag in config.attention.cuts),
        )
        if on
    ]
    if others:
        raise CfspError(
            f"on a mixture-of-experts model, the expert cuts cannot be combined with {', '.join(others)} "
            "yet; prune the routed experts alone"
        )
    for index, moe in enumerate(moes):
        if moe is not None:
            check_expert_count(moe, kept_count(moe.count, config.expert_sparsity), f"block {index}")
    if config.expert_channel_sparsity:
        moe = next(m for m in moes if m is not None)
        changed = _stock_shapes_change(
            model, moe.width, kept_count(moe.width, config.expert_channel_sparsity)
        )
        if changed:
            raise CfspError(
                f"{model.config.model_type} sizes other tensors from the experts' width ({changed} would change "
                "with it, e.g. shared experts), so --expert-channel-sparsity cannot give its stock checkpoint yet; "
                "use --expert-sparsity"
            )


def with_expert_budget(config: PruneConfig, model: nn.Module) -> PruneConfig:
    """Budget mode on a mixture-of-experts model: ``total_sparsity`` of all parameters taken in whole
    routed experts (the same number from every MoE block, and from every group under group-limited
    routing), after any channels inside experts: the nearest count that routing allows."""
    layers = decoder_layers(model) if config.total_sparsity is not None else None
    moes = [m for m in moe_blocks(layers) if m is not None] if layers is not None else []
    if not moes:  # no budget, or not an MoE model (unsupported ones are named by check_model)
        return config
    total = count_parameters(model)
    moe = moes[0]
    per_expert = moe.parameters_per_expert
    narrowed = (
        kept_count(moe.width, config.expert_channel_sparsity) / moe.width
        if config.expert_channel_sparsity
        else 1.0
    )
    channels = (1 - narrowed) * per_expert * moe.count * len(moes)
    wanted = (config.total_sparsity * total - channels) / (per_expert * narrowed * len(moes))
    step = moe.groups  # experts removed per block come in whole groups' worth
    removed = int(round(max(wanted, 0) / step)) * step
    top_k = moe.top_k or 1
    removed = min(removed, moe.count - max(top_k, 2 * step if step > 1 else top_k))
    if removed <= 0 and not config.expert_channel_sparsity:
        raise CfspError(
            f"--total-sparsity {config.total_sparsity} is less than one routed expert per block on this model "
            f"({per_expert * len(moes) / total:.4f} of its parameters); give a larger budget"
        )
    expert_sparsity = removed / moe.count
    reached = (removed * per_expert * narrowed * len(moes) + channels) / total
    log.info(
        f"budget: {config.total_sparsity} of all parameters = {removed} of {moe.count} routed experts per "
        f"block{' + channels inside experts' if channels else ''} ({reached:.4f} of the parameters)"
    )
    return config.with_changes(expert_sparsity=expert_sparsity, sparsity=0.0)


def _stock_shapes_change(model: nn.Module, width: int, new_width: int) -> str | None:
    """The first tensor outside the routed experts whose shape the family's own class would change
    if the config's expert width changed (None: only the experts change)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    set_expert_width(config, width, new_width)
    with init_empty_weights():
        fresh = AutoModelForCausalLM.from_config(config)
    experts = {
        id(p) for m in moe_blocks(decoder_blocks(model)) if m is not None for p in m.experts.parameters()
    }
    ours = {name: p for name, p in model.named_parameters() if id(p) not in experts}
    for name, parameter in fresh.named_parameters():
        if name in ours and tuple(ours[name].shape) != tuple(parameter.shape):
            return name
    return None


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
    channels = bool(config.expert_channel_sparsity)
    run_blocks(
        model,
        calib,
        [BlockMovement(records), ExpertRouting(records, channels)],
        batch_size=config.batch_size,
        placement=placement,
        progress=progress,
        description="routing statistics",
    )
    widths = ffn_widths(model)
    kept: list[torch.Tensor | None] = []
    kept_channels: list[torch.Tensor | None] = []
    scores: list[list[float] | None] = []
    unrouted: list[int | None] = []
    new_widths = list(widths)
    for index, (moe, record) in enumerate(zip(moes, records, strict=True)):
        if moe is None:
            kept.append(None), kept_channels.append(None), scores.append(None), unrouted.append(None)
            continue
        score = expert_scores(config.expert_metric, record.experts, index).cpu()
        kept.append(choose_experts(score, kept_count(moe.count, config.expert_sparsity), moe.groups))
        scores.append(score.tolist())
        unrouted.append(record.experts.unrouted)
        if channels:  # each kept expert's best channels, as many in every expert
            width = kept_count(moe.width, config.expert_channel_sparsity)
            channel_scores = expert_channel_scores(record.experts).cpu()[kept[-1]]
            order = torch.argsort(channel_scores, dim=1, descending=True, stable=True)[:, :width]
            kept_channels.append(torch.sort(order, dim=1).values)
            new_widths[index] = width
        else:
            kept_channels.append(None)
    never = sum(u for u in unrouted if u)
    if never:
        log.warning(
            f"{never} routed expert(s) received no calibration token (scored lowest); more or more varied "
            "calibration windows would rank them"
        )
    attention_importance, mlp_importance = sublayer_importance(records)
    plan = Plan(
        config=config,
        original_widths=widths,
        widths=new_widths,
        kept_channels=[torch.arange(w) for w in new_widths],
        keep_fractions=[w / o for w, o in zip(new_widths, widths, strict=True)],
        block_importance=block_importance(records, config.block_metric),
        attention_importance=attention_importance,
        mlp_importance=mlp_importance,
        calibration=calibration,
        compensation_rule="none",
        original_experts=[None if m is None else m.count for m in moes],
        kept_experts=kept,
        expert_scores=scores,
        unrouted_experts=unrouted,
        kept_expert_channels=kept_channels if channels else None,
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
    counts, widths = set(), set()
    channels = plan.kept_expert_channels or [None] * len(blocks)
    for index, kept in enumerate(plan.kept_experts):  # every block: a streamed output writes each
        placement.onload(index)
        if kept is not None:
            moe = moe_blocks([blocks[index]])[0]  # after onload: the block's own (streamed) tensors
            check_expert_count(moe, int(kept.numel()), f"block {index}")
            width = moe.width
            keep_experts(moe, kept)
            if channels[index] is not None:
                keep_expert_channels(moe, channels[index])
            counts.add(int(kept.numel()))
            widths.add((width, moe.width))
        placement.offload(index)
    if len(counts) != 1 or len(widths) != 1:
        raise CfspError(
            "every mixture-of-experts block must keep the same number of experts of one width (one config "
            "count and width)"
        )
    original = next(n for n in plan.original_experts if n is not None)
    set_expert_count(model.config, original, counts.pop())
    old_width, new_width = widths.pop()
    if new_width != old_width:
        set_expert_width(model.config, old_width, new_width)
    plan.params_after = count_parameters(model)
    plan.active_params_after = active_parameters(model)
    log.info(
        f"kept {plan.experts_after} of {plan.experts_before} routed experts; parameters "
        f"{plan.params_before:,} -> {plan.params_after:,}, active per token {plan.active_params_before:,} -> "
        f"{plan.active_params_after:,}"
    )
    return plan
