"""``prune``: calibration -> importance -> allocation -> surgery, and the result every later step reads."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from cfsp import allocation as alloc
from cfsp import layouts
from cfsp.attention import (
    attention_blocks,
    attention_drop_count,
    budget_sparsity,
    choose_dropped_attention,
    choose_kv_groups,
    kv_group_cut,
    search_drop_count,
)
from cfsp.calibration import BlockStats, InMemoryBlocks, calibrate
from cfsp.compensation import Compensation, compensate, refit_or_mean, refit_out_projection
from cfsp.config import PruneConfig
from cfsp.errors import CfspError
from cfsp.models import (
    block_mlp,
    check_supported,
    count_parameters,
    decoder_blocks,
    ffn_widths,
)
from cfsp.reconstruction import block_outputs_after, reconstruct_mlp
from cfsp.scoring import (
    ChannelInputs,
    block_importance,
    channel_scores,
    kv_group_scores,
    sublayer_importance,
)
from cfsp.surgery import AttentionCut, apply_pruning, needs_bias, set_config_widths, slice_mlp

log = logging.getLogger("cfsp")


@dataclass
class PruneResult:
    """Everything later steps need: saving, reporting, recovery and benchmarks never recompute it."""

    method: str
    options: dict
    target_sparsity: float
    realised_sparsity: float
    original_widths: list[int]
    widths: list[int]
    keep_fractions: list[float]
    block_importance: list[float] | None
    kept_channels: list[torch.Tensor]
    params_before: int
    params_after: int
    calibration: dict | None = None
    seconds: float = 0.0
    down_biases: list[torch.Tensor] | None = None  # bias compensation added to down_proj, per block
    reconstruction: list[dict] | None = None  # per reconstructed block: its loss before and after
    attention_importance: list[float] | None = None  # angular distance across each attention sublayer
    mlp_importance: list[float] | None = None  # ... and across each MLP sublayer
    dropped_attention: list[int] = field(default_factory=list)  # blocks whose attention was removed
    attention_search: list[dict] | None = None  # drop_attention="auto": each count tried, its loss
    kept_kv_groups: list[torch.Tensor | None] | None = None  # per block, its KV groups kept (kv_groups)

    def to_plan(self) -> dict:
        """A JSON-ready description (kept channels and groups as lists of ints)."""
        plan = asdict(self)
        plan["kept_channels"] = [k.tolist() for k in self.kept_channels]
        if self.kept_kv_groups is not None:
            plan["kept_kv_groups"] = [None if g is None else g.tolist() for g in self.kept_kv_groups]
        if self.down_biases is not None:
            plan["down_biases"] = [b.tolist() for b in self.down_biases]
        return plan


def prune(
    model: nn.Module,
    calib: torch.Tensor | None = None,
    config: PruneConfig | float | None = None,
    *,
    progress: bool = True,
    calibration: dict | None = None,
    stats: list[BlockStats] | None = None,
    placement: InMemoryBlocks | None = None,
    **options,
) -> PruneResult:
    """Prune the FFN channels of ``model`` in place as ``config`` says (a ``PruneConfig``).

    ``config`` may also be the sparsity, with the other options as keywords
    (``prune(model, calib, 0.5, method="flap")``); keywords given beside a config replace its
    values. Every option is checked when the config is made, so a typo fails in a second, not after
    the calibration pass. ``stats`` reuses an earlier ``calibrate`` of the same dense model: every
    method scores dense activations, so one pass can serve several methods and sparsities.
    ``placement`` says where block weights live (default: in memory; ``cfsp.streaming`` streams
    them from safetensors). ``calibration`` describes the windows for the plan.
    """
    started = time.perf_counter()
    config = PruneConfig.from_options(config, **options)
    search = None
    if config.drop_attention == "auto":
        if placement is not None or calib is None:
            raise CfspError(
                "--drop-attention auto prunes copies of the model in memory with calibration windows; "
                "load the model whole (--no-stream) or give a count"
            )
        count, search = search_drop_count(model, calib, config)
        log.info(f"--drop-attention auto chose {count} attention sublayers")
        config = replace(config, drop_attention=count)
    if config.sequential and calib is None:
        raise CfspError("sequential pruning needs calibration windows (pass calib / --calib-source)")
    check_supported(model)
    if placement is None and any(p.is_meta for p in model.parameters()):
        raise CfspError(
            "some weights are offloaded (device_map with cpu/disk offload leaves them on the meta device) "
            "and cannot be pruned in place; prune the safetensors directory instead, which streams it "
            "block by block: cfsp prune --model DIR"
        )
    wants_stats = config.needs_calibration
    if wants_stats and calib is None and stats is None:
        raise CfspError(f"method {config.method!r} needs calibration windows (pass calib / --calib-source)")
    blocks = decoder_blocks(model)
    original = ffn_widths(model)
    if config.uniform and len(set(original)) > 1:
        raise CfspError(
            f"--uniform needs blocks of one FFN width, this model's differ ({min(original)}-{max(original)}, "
            "e.g. Gemma 4's double-wide layers); prune it without --uniform"
        )
    drop_count = attention_drop_count(model, config)
    heads_after = kv_group_cut(model, config)
    if heads_after is not None and stats is not None:
        raise CfspError("--kv-groups scores heads on its own calibration pass; call prune without stats")
    config = _with_budget(
        config, model, attention_blocks(blocks)[:drop_count], original
    )  # exact once chosen below
    check_achievable(config, original)
    params_before = count_parameters(model)
    placement = placement or InMemoryBlocks()
    placement.offload_activations = config.offload_activations
    scores: list[torch.Tensor | None] = [None] * len(blocks)
    group_scores: list[torch.Tensor | None] = [None] * len(blocks)

    def score(index: int, block_stats: BlockStats | None) -> bool:
        """Channel (and KV-group) scores of one block, taken while its weights are on the device."""
        scores[index] = _block_scores(block_mlp(blocks[index]), block_stats, config)
        if heads_after is not None and block_stats is not None and block_stats.heads is not None:
            out = getattr(blocks[index], layouts.ATTENTION).o_proj.weight
            width = heads_after.group_size * heads_after.head_dim
            group_scores[index] = kv_group_scores(
                config.kv_group_metric, out, block_stats.heads, width, config.refit_damping
            ).cpu()
            block_stats.heads.gram = None  # only the surgery pass keeps one, a block at a time
        return False

    if wants_stats and stats is None:
        stats = calibrate(
            model,
            calib,
            batch_size=config.batch_size,
            after_block=score,
            progress=progress,
            second_moments=False,  # collected one block at a time in the second pass
            window_stats=config.needs_window_stats,
            placement=placement,
            head_channels=heads_after is not None,
        )
    else:
        stats = stats if wants_stats else [None] * len(blocks)  # e.g. Magnitude-SP: weights only
        for index in range(len(blocks)):
            placement.onload(index)
            score(index, stats[index])
            placement.offload(index)
    importance = block_importance(stats, config.block_metric) if wants_stats else None
    attention_importance = mlp_importance = None
    if wants_stats:
        attention_importance, mlp_importance = sublayer_importance(stats)
    dropped = choose_dropped_attention(blocks, attention_importance, drop_count)
    if config.total_sparsity is not None:
        config = _with_budget(config, model, dropped, original)
        log.info(
            f"budget: {config.total_sparsity} of all parameters = {len(dropped)} attention sublayers + FFN "
            f"sparsity {config.sparsity:.4f}"
        )
    cut = AttentionCut(dropped=dropped, heads=heads_after)
    if heads_after is not None:
        cut.kept_groups = choose_kv_groups(
            [None if i in dropped else g for i, g in enumerate(group_scores)], config.kv_groups
        )
        log.info(
            f"removing {config.kv_groups} KV group(s) from each attention sublayer: {heads_after.heads} heads, "
            f"{heads_after.kv_heads} KV heads remain"
        )
    if dropped:
        log.info(
            f"dropping the attention of blocks {', '.join(map(str, dropped))} (angular importance "
            f"{', '.join(f'{attention_importance[i]:.4f}' for i in dropped)})"
        )

    keep, kept = _allocate(config, scores, importance, stats)
    kept = [k if k.numel() else s.argmax().view(1) for k, s in zip(kept, scores, strict=True)]
    check_realised(config, [k.numel() for k in kept], original)
    # The refit's fallback is decided before any second moment is collected.
    base = config.compensation
    if base in ("refit", "reconstruct"):
        fallback = "none" if config.uniform else "mean"  # a stock output has no bias to put the mean in
        base = refit_or_mean(stats[0].tokens, max(k.numel() for k in kept), fallback)

    placement.begin_output()
    have_grams = all(s is not None and s.gram is not None for s in stats)  # e.g. a benchmark's reused pass
    reconstruction = None
    if config.sequential or config.reconstructs or (base == "refit" and not have_grams):
        if calib is None:
            raise CfspError(
                f"compensation {config.compensation!r} takes a second pass over the calibration windows: "
                "pass calib beside stats"
            )
        kept, biases, reconstruction = _second_pass(
            model, calib, kept, config, base, progress, placement, cut
        )
    else:
        biases = _surgery(model, kept, stats, base, config, placement, cut)
    widths = [int(k.numel()) for k in kept]
    # The refit may have fallen back to the mean; reconstruction is recorded as such, from its start.
    done = config if config.reconstructs else replace(config, compensation=base)
    return PruneResult(
        method=config.method,
        options=done.to_dict(),
        target_sparsity=float(config.sparsity),
        realised_sparsity=1.0 - sum(widths) / sum(original),
        original_widths=original,
        widths=widths,
        keep_fractions=[float(f) for f in keep],
        block_importance=importance,
        kept_channels=kept,
        params_before=params_before,
        params_after=count_parameters(model),
        calibration=calibration if importance is not None else None,
        seconds=time.perf_counter() - started,
        down_biases=biases,
        reconstruction=reconstruction,
        attention_importance=attention_importance,
        mlp_importance=mlp_importance,
        dropped_attention=dropped,
        attention_search=search,
        kept_kv_groups=cut.kept_groups,
    )


SPARSITY_TOLERANCE = 0.02  # realised FFN sparsity may always differ from the request by this much


def sparsity_tolerance(full: list[int], multiple: int, rounding: str) -> float:
    """How far rounding alone may move the realised sparsity: at least ``SPARSITY_TOLERANCE``.

    ``nearest`` (and the reference's half-up) rounds every block by up to half a multiple, so its
    errors add up; ``budget`` keeps the total within one multiple. A miss beyond that means the
    multiple is too coarse for the FFN.
    """
    steps = [min(multiple, d) for d in full]
    reach = max(steps) if rounding == "budget" else sum(steps) / 2
    return max(SPARSITY_TOLERANCE, reach / sum(full))


def check_achievable(config: PruneConfig, full: list[int]) -> None:
    """Before any work: can widths in multiples of ``multiple`` get near the sparsity at all?"""
    multiple, sparsity = config.multiple, config.sparsity
    if multiple >= max(full):
        raise CfspError(
            f"--multiple {multiple} is not below the FFN width of any block ({min(full)}-{max(full)}): no "
            f"channel could be removed; use a multiple below {max(full)} (1 = no rounding)"
        )
    highest = 1.0 - sum(min(multiple, d) for d in full) / sum(full)
    if sparsity > highest + sparsity_tolerance(full, multiple, config.rounding):
        _inexact(
            f"FFN sparsity {sparsity} is out of reach with widths in multiples of {multiple} (FFN widths "
            f"{min(full)}-{max(full)}): the achievable range is 0.000-{highest:.3f}",
            config.allow_inexact,
        )


def check_realised(config: PruneConfig, widths: list[int], full: list[int]) -> None:
    """After allocation, before surgery: the widths must meet the request within the tolerance."""
    multiple, sparsity = config.multiple, config.sparsity
    realised = 1.0 - sum(widths) / sum(full)
    if sum(widths) >= sum(full):  # a compensation bias would make the "pruned" model larger
        raise CfspError(
            f"the widths keep every FFN channel (multiple {multiple}, FFN widths {min(full)}-{max(full)}), "
            f"so FFN sparsity {sparsity} removes nothing; lower --multiple or raise --sparsity"
        )
    if abs(realised - sparsity) > sparsity_tolerance(full, multiple, config.rounding):
        _inexact(
            f"the widths give FFN sparsity {realised:.3f}, not the requested {sparsity} (multiple "
            f"{multiple}, FFN widths {min(full)}-{max(full)})",
            config.allow_inexact,
        )


def _inexact(problem: str, allow_inexact: bool) -> None:
    if not allow_inexact:
        raise CfspError(f"{problem}; lower --multiple or pass --allow-inexact to accept it")
    log.warning(f"{problem}; continuing because of --allow-inexact")


def _with_budget(config: PruneConfig, model: nn.Module, dropped: list[int], full: list[int]) -> PruneConfig:
    """Budget mode: the config with the FFN sparsity that completes ``total_sparsity`` beside the
    dropped attention sublayers and KV groups, checked against the widths' reach."""
    if config.total_sparsity is None:
        return config
    config = replace(
        config, sparsity=budget_sparsity(model, config.total_sparsity, dropped, config.kv_groups)
    )
    check_achievable(config, full)
    return config


def _allocate(
    config: PruneConfig,
    scores: list[torch.Tensor],
    importance: list[float] | None,
    stats: list[BlockStats | None],
) -> tuple[list[float], list[torch.Tensor]]:
    """Keep fractions and kept channel indices per block."""
    full = [s.numel() for s in scores]
    sparsity, multiple, rounding = config.sparsity, config.multiple, config.rounding
    threshold = config.selection == "threshold"
    if config.allocation == "global":
        if threshold:
            kept = alloc.reference_global_kept(scores, sparsity)
        else:
            widths = alloc.global_widths(scores, sparsity, multiple, rounding)
            kept = [alloc.top_channels(s, w) for s, w in zip(scores, widths, strict=True)]
        return [k.numel() / d for k, d in zip(kept, full, strict=True)], kept

    if config.allocation == "uniform":
        keep = alloc.uniform_keep_fractions(len(scores), sparsity)
        if threshold:
            return keep, [alloc.reference_uniform_kept(s, sparsity) for s in scores]
    elif config.importance_scale == "sum":
        sums = [m * s.tokens for m, s in zip(importance, stats, strict=True)]
        keep = alloc.reference_keep_fractions(sums, sparsity)
    else:
        keep = alloc.cfsp_keep_fractions(importance, sparsity, config.temperature, full)

    if rounding == "reference":
        widths = alloc.reference_widths(keep, full, multiple)
    else:
        widths = alloc.widths_from_fractions(keep, full, multiple, rounding)
    choose = alloc.reference_kept_channels if threshold else alloc.top_channels
    return keep, [choose(s, w) for s, w in zip(scores, widths, strict=True)]


def _block_scores(mlp: nn.Module, stats: BlockStats | None, config: PruneConfig) -> torch.Tensor:
    """Channel scores of one block's MLP from its recorded statistics."""
    gate_up = layouts.input_weights(mlp)  # [gate, up] or [up]
    inputs = ChannelInputs(
        down_weight=layouts.down_projection(mlp).weight,
        up_weight=gate_up[-1],
        gate_weight=gate_up[0] if len(gate_up) == 2 else None,
        stats=stats,
        b=config.b,
        c=config.c,
        window_fluctuation=config.fluctuation == "windows",
    )
    return channel_scores(config.channel_metric, inputs).cpu()


def _surgery(
    model: nn.Module,
    kept: list[torch.Tensor],
    stats: list[BlockStats | None],
    compensation: str,
    config: PruneConfig,
    placement: InMemoryBlocks,
    cut: AttentionCut,
) -> list[torch.Tensor] | None:
    """Slice every block to its kept channels with its compensation and cut its attention; returns
    the added biases."""
    done = replace(config, compensation=compensation)
    biases = []

    def compensation_of(index: int, block: nn.Module) -> Compensation:
        down = layouts.down_projection(block_mlp(block)).weight
        fix = compensate(
            compensation, down, kept[index], stats[index], config.refit_damping, not config.uniform
        )
        if compensation == "refit":
            fix.out_weight = _refit_out(block, index, cut, stats[index], config)
        if stats[index] is not None and placement.writing:
            stats[index].drop_second_moments()  # D x D, no longer needed once the block is written
        biases.append(fix.bias)
        return fix

    apply_pruning(
        model,
        kept,
        compensation_of,
        placement,
        compensated=done.adds_bias,
        uniform=config.uniform,
        attention=cut,
    )
    return biases if done.adds_bias else None


def _refit_out(
    block: nn.Module, index: int, cut: AttentionCut, stats: BlockStats | None, config: PruneConfig
) -> torch.Tensor | None:
    """The refit o_proj of a block whose KV groups are cut (None: not cut, or no refit possible)."""
    groups = cut.kept_groups[index] if cut.kept_groups is not None and index not in cut.dropped else None
    if groups is None or stats is None or stats.heads is None:
        return None
    columns = layouts.group_rows(cut.heads, groups, query=True)
    out = getattr(block, layouts.ATTENTION).o_proj.weight
    return refit_out_projection(out, columns, stats.heads, config.refit_damping)


def _second_pass(
    model: nn.Module,
    calib: torch.Tensor,
    decided: list[torch.Tensor],
    config: PruneConfig,
    compensation: str,
    progress: bool,
    placement: InMemoryBlocks,
    cut: AttentionCut,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[dict] | None]:
    """Prune block by block in a second calibration pass; each block's Gram matrix and activations
    live only there.

    ``config.sequential``: re-choose each block's channels on the activations of the
    already-pruned blocks before it, so later blocks adapt to the error the earlier ones made.
    Widths stay as decided from the dense pass (allocation needs every block's importance first).
    Otherwise the channels stay as decided and the next block sees the *dense* output: the refit
    from dense statistics, with one Gram matrix in memory at a time. ``compensation`` is the rule
    applied when slicing (the refit, or its fallback); ``reconstruct`` then trains the sliced MLP.
    """
    rechoose = config.sequential
    reconstruct = config.reconstructs
    pruned_inputs = reconstruct and config.reconstruct_inputs == "pruned"
    widths = [k.numel() for k in decided]
    compensated = replace(config, compensation=compensation).adds_bias
    with_bias = needs_bias(model, compensated)
    kept: list[torch.Tensor] = list(decided)
    biases: list[torch.Tensor] | None = [] if compensated else None
    reports: list[dict] = []

    def prune_block(index: int, stats: BlockStats) -> bool | list[torch.Tensor]:
        block = decoder_blocks(model)[index]
        mlp = block_mlp(block)
        full = layouts.mlp_width(mlp)
        if rechoose:
            kept[index] = alloc.top_channels(_block_scores(mlp, stats, config), widths[index])
        down = layouts.down_projection(mlp).weight
        fix = compensate(compensation, down, kept[index], stats, config.refit_damping, not config.uniform)
        if biases is not None:
            biases.append(fix.bias)
        out_weight = _refit_out(block, index, cut, stats, config) if compensation == "refit" else None
        stats.drop_second_moments()  # D x D: free it as soon as the block is done
        slice_mlp(mlp, kept[index], fix.bias, with_bias=with_bias, down_weight=fix.weight)
        cut.apply(index, block, out_weight)
        if reconstruct and kept[index].numel() < full:  # a block that keeps every channel stays as it is
            report = reconstruct_mlp(block, stats.mlp, index, config, progress)
            reports.append(report.to_dict())
            if pruned_inputs and report.target == "block":  # output = residual + MLP: no rerun needed
                return block_outputs_after(block, stats.mlp)
        return rechoose or pruned_inputs  # True: the next block sees this block's pruned output

    calibrate(
        model,
        calib,
        batch_size=config.batch_size,
        after_block=prune_block,
        progress=progress,
        second_moments=compensation == "refit",
        window_stats=config.needs_window_stats,
        placement=placement,
        record_mlp=reconstruct,
        dense_stream=reconstruct and (pruned_inputs or rechoose),
        head_channels=cut.heads is not None,
    )
    set_config_widths(model.config, widths, with_bias, uniform=config.uniform)
    cut.record(model.config)
    if reconstruct:
        _log_reconstruction(reports)
    return kept, biases, (reports if reconstruct else None)


def _log_reconstruction(reports: list[dict]) -> None:
    if not reports:
        return
    key = "heldout" if reports[0]["heldout_before"] is not None else "loss"
    before = sum(r[f"{key}_before"] for r in reports) / len(reports)
    after = sum(r[f"{key}_after"] for r in reports) / len(reports)
    kept_refit = sum(r["kept_refit"] for r in reports)
    log.info(
        f"reconstructed {len(reports)} MLPs: mean relative error {before:.4f} -> {after:.4f}"
        f"{' (held-out windows)' if key == 'heldout' else ''}; {kept_refit} kept the refit"
    )
