"""``prune``: calibration -> importance -> allocation -> surgery, and the result every later step reads."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cfsp import allocation as alloc
from cfsp import layouts
from cfsp.calibration import BlockStats, InMemoryBlocks, calibrate
from cfsp.compensation import COMPENSATIONS, DEFAULT_DAMPING, compensate, refit_or_mean
from cfsp.errors import CfspError
from cfsp.methods import ALLOCATIONS, get_method, needs_calibration
from cfsp.models import (
    block_mlp,
    check_supported,
    count_parameters,
    decoder_blocks,
    ffn_widths,
)
from cfsp.scoring import BLOCK_METRICS, CHANNEL_METRICS, ChannelInputs, block_importance, channel_scores
from cfsp.surgery import set_config_widths, slice_mlp

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

    def to_plan(self) -> dict:
        """A JSON-ready description (kept channels as lists of ints)."""
        plan = asdict(self)
        plan["kept_channels"] = [k.tolist() for k in self.kept_channels]
        if self.down_biases is not None:
            plan["down_biases"] = [b.tolist() for b in self.down_biases]
        return plan


def prune(
    model: nn.Module,
    calib: torch.Tensor | None = None,
    sparsity: float = 0.5,
    *,
    method: str = "cfsp",
    block_metric: str = "angular",
    channel_metric: str | None = None,
    allocation: str | None = None,
    temperature: float = alloc.DEFAULT_TEMPERATURE,
    b: float = 1.0,
    c: float = 1.0,
    multiple: int | None = None,
    rounding: str = "budget",
    bias_compensation: bool | None = None,
    compensation: str | None = None,
    refit_damping: float = DEFAULT_DAMPING,
    reference: bool = False,
    sequential: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    calibration: dict | None = None,
    stats: list[BlockStats] | None = None,
    allow_inexact: bool = False,
    placement: InMemoryBlocks | None = None,
    offload_activations: bool = False,
) -> PruneResult:
    """Prune the FFN channels of ``model`` in place to a global FFN ``sparsity``.

    ``channel_metric``, ``allocation``, ``multiple`` and ``compensation`` default to the method's
    own; ``compensation`` is ``none``, ``mean`` (FLAP's mean output of the pruned channels in
    down_proj's bias; ``bias_compensation=True`` is the older spelling) or ``refit`` (ridge least
    squares of down_proj on the kept channels, damped by ``refit_damping``; see ``compensation.py``); ``rounding`` says how widths
    meet the multiple (``budget``: the total hits the target; ``nearest``: per block); ``reference``
    switches every deliberate deviation back to the reference implementation's numerics. ``stats``
    reuses an earlier ``calibrate`` of the same dense model: every method scores dense activations,
    so one pass can serve several methods and sparsities. ``sequential`` re-chooses each block's
    channels on the activations of the already-pruned blocks before it (a second pass).
    Widths that miss the target by more than ``SPARSITY_TOLERANCE`` (a multiple too coarse for the
    FFN) are an error unless ``allow_inexact``, which only warns. Every option is checked before
    any work, so a typo fails in a second, not after the calibration pass. ``placement`` says where
    block weights live (default: in memory; ``cfsp.streaming`` streams them from safetensors);
    ``offload_activations`` keeps the calibration activations on the CPU between blocks, for a GPU
    that holds a block but not ``nsamples x seqlen x hidden`` activations twice.
    """
    started = time.perf_counter()
    opts = resolve_options(
        sparsity,
        method=method,
        block_metric=block_metric,
        channel_metric=channel_metric,
        allocation=allocation,
        temperature=temperature,
        b=b,
        c=c,
        multiple=multiple,
        rounding=rounding,
        bias_compensation=bias_compensation,
        compensation=compensation,
        refit_damping=refit_damping,
        reference=reference,
        sequential=sequential,
        batch_size=batch_size,
    )
    channel_metric, allocation, multiple = opts["channel_metric"], opts["allocation"], opts["multiple"]
    rounding, compensation = opts["rounding"], opts["compensation"]
    refit = compensation == "refit"
    if sequential and calib is None:
        raise CfspError("sequential pruning needs calibration windows (pass calib / --calib-source)")
    check_supported(model)
    if placement is None and any(p.is_meta for p in model.parameters()):
        raise CfspError(
            "some weights are offloaded (device_map with cpu/disk offload leaves them on the meta device) "
            "and cannot be pruned in place; prune the safetensors directory instead, which streams it "
            "block by block: cfsp prune --model DIR"
        )
    wants_stats = needs_calibration(channel_metric, allocation) or compensation != "none"
    if wants_stats and calib is None and stats is None:
        raise CfspError(f"method {method!r} needs calibration windows (pass calib / --calib-source)")
    blocks = decoder_blocks(model)
    original = ffn_widths(model)
    check_achievable(sparsity, original, multiple, rounding, allow_inexact)
    params_before = count_parameters(model)
    placement = placement or InMemoryBlocks()
    placement.offload_activations = offload_activations
    scores: list[torch.Tensor | None] = [None] * len(blocks)

    def score(index: int, block_stats: BlockStats | None) -> bool:
        """Channel scores of one block, taken while its weights are on the device."""
        mlp = block_mlp(blocks[index])
        scores[index] = _block_scores(mlp, block_stats, channel_metric, b, c, reference)
        return False

    if wants_stats and stats is None:
        stats = calibrate(
            model,
            calib,
            batch_size=batch_size,
            after_block=score,
            progress=progress,
            second_moments=refit and not sequential and not placement.streams,
            placement=placement,
        )
    else:
        stats = stats if wants_stats else [None] * len(blocks)  # e.g. Magnitude-SP: weights only
        for index in range(len(blocks)):
            placement.onload(index)
            score(index, stats[index])
            placement.offload(index)
    importance = block_importance(stats, block_metric) if wants_stats else None

    keep, kept = _allocate(
        allocation, scores, importance, stats, sparsity, temperature, multiple, rounding, reference
    )
    kept = [k if k.numel() else s.argmax().view(1) for k, s in zip(kept, scores, strict=True)]
    check_realised(sparsity, [k.numel() for k in kept], original, multiple, rounding, allow_inexact)
    if refit:
        compensation = refit_or_mean(stats[0].tokens, max(k.numel() for k in kept))
        refit = compensation == "refit"

    placement.begin_output()
    if sequential or (refit and placement.streams):  # streamed: no Gram matrices kept from pass one
        kept, biases = _second_pass(
            model,
            calib,
            kept,
            channel_metric,
            b,
            c,
            compensation,
            refit_damping,
            batch_size,
            progress,
            placement,
            rechoose=sequential,
        )
    else:
        biases = _surgery(model, kept, stats, compensation, refit_damping, placement)
    widths = [int(k.numel()) for k in kept]
    options = dict(
        block_metric=block_metric,
        channel_metric=channel_metric,
        allocation=allocation,
        temperature=temperature,
        b=b,
        c=c,
        multiple=multiple,
        rounding=rounding,
        bias_compensation=compensation != "none",
        compensation=compensation,
        refit_damping=refit_damping if refit else None,
        reference=reference,
        sequential=sequential,
    )
    return PruneResult(
        method=method,
        options=options,
        target_sparsity=float(sparsity),
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
    )


def resolve_options(
    sparsity: float,
    *,
    method: str = "cfsp",
    block_metric: str = "angular",
    channel_metric: str | None = None,
    allocation: str | None = None,
    temperature: float = alloc.DEFAULT_TEMPERATURE,
    b: float = 1.0,
    c: float = 1.0,
    multiple: int | None = None,
    rounding: str = "budget",
    bias_compensation: bool | None = None,
    compensation: str | None = None,
    refit_damping: float = DEFAULT_DAMPING,
    reference: bool = False,
    sequential: bool = False,
    batch_size: int = 8,
) -> dict:
    """Fill in the method's defaults and check every option; the CLI calls this before loading a model."""
    spec = get_method(method)
    defaults = {"channel_metric": spec.channel_metric, "compensation": spec.compensation}
    if reference:
        defaults.update(spec.reference_defaults)
    numbers = (("sparsity", sparsity), ("temperature", temperature), ("b", b), ("c", c))
    for name, value in (*numbers, ("refit_damping", refit_damping)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise CfspError(f"{name} must be a finite number, got {value}")
    if not 0.0 < float(sparsity) < 1.0:
        raise CfspError(f"sparsity must be in (0, 1), got {sparsity}; e.g. 0.5 removes half the FFN channels")
    channel_metric = channel_metric or defaults["channel_metric"]
    allocation = allocation or spec.allocation
    multiple = spec.multiple if multiple is None else int(multiple)
    if block_metric not in BLOCK_METRICS:
        raise CfspError(f"unknown block metric {block_metric!r}; choose one of {', '.join(BLOCK_METRICS)}")
    if channel_metric not in CHANNEL_METRICS:
        raise CfspError(
            f"unknown channel metric {channel_metric!r}; choose one of {', '.join(CHANNEL_METRICS)}"
        )
    if allocation not in ALLOCATIONS:
        raise CfspError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if multiple < 1:
        raise CfspError(f"multiple must be >= 1 (1 = no rounding), got {multiple}")
    if rounding not in alloc.ROUNDINGS:
        raise CfspError(f"unknown rounding {rounding!r}; choose one of {', '.join(alloc.ROUNDINGS)}")
    if temperature < 0:
        raise CfspError(f"temperature must be >= 0, got {temperature}")
    if batch_size < 1:
        raise CfspError(f"batch size must be >= 1, got {batch_size}")
    if compensation is None and bias_compensation is not None:  # the older boolean spelling
        compensation = "mean" if bias_compensation else "none"
    compensation = compensation or defaults["compensation"]
    if compensation not in COMPENSATIONS:
        raise CfspError(f"unknown compensation {compensation!r}; choose one of {', '.join(COMPENSATIONS)}")
    if refit_damping < 0:
        raise CfspError(f"refit damping must be >= 0, got {refit_damping}")
    if sequential and reference:
        raise CfspError("--sequential cannot be combined with --reference (the reference has no such mode)")
    return dict(
        block_metric=block_metric,
        channel_metric=channel_metric,
        allocation=allocation,
        multiple=multiple,
        rounding="nearest" if reference else rounding,  # the reference rounds each block on its own
        compensation=compensation,
    )


SPARSITY_TOLERANCE = 0.02  # realised FFN sparsity may always differ from the request by this much


def sparsity_tolerance(full: list[int], multiple: int, rounding: str) -> float:
    """How far rounding alone may move the realised sparsity: at least ``SPARSITY_TOLERANCE``.

    ``nearest`` rounds every block by up to half a multiple, so its errors add up; ``budget`` keeps
    the total within one multiple. A miss beyond that means the multiple is too coarse for the FFN.
    """
    steps = [min(multiple, d) for d in full]
    reach = sum(steps) / 2 if rounding == "nearest" else max(steps)
    return max(SPARSITY_TOLERANCE, reach / sum(full))


def check_achievable(
    sparsity: float, full: list[int], multiple: int, rounding: str, allow_inexact: bool
) -> None:
    """Before any work: can widths in multiples of ``multiple`` get near ``sparsity`` at all?"""
    highest = 1.0 - sum(min(multiple, d) for d in full) / sum(full)
    if sparsity > highest + sparsity_tolerance(full, multiple, rounding):
        _inexact(
            f"FFN sparsity {sparsity} is out of reach with widths in multiples of {multiple} (FFN widths "
            f"{min(full)}-{max(full)}): the achievable range is 0.000-{highest:.3f}",
            allow_inexact,
        )


def check_realised(
    sparsity: float, widths: list[int], full: list[int], multiple: int, rounding: str, allow_inexact: bool
) -> None:
    """After allocation, before surgery: the widths must meet the request within the tolerance."""
    realised = 1.0 - sum(widths) / sum(full)
    if abs(realised - sparsity) > sparsity_tolerance(full, multiple, rounding):
        _inexact(
            f"the widths give FFN sparsity {realised:.3f}, not the requested {sparsity} (multiple "
            f"{multiple}, FFN widths {min(full)}-{max(full)})",
            allow_inexact,
        )


def _inexact(problem: str, allow_inexact: bool) -> None:
    if not allow_inexact:
        raise CfspError(f"{problem}; lower --multiple or pass --allow-inexact to accept it")
    log.warning(f"{problem}; continuing because of --allow-inexact")


def _allocate(
    allocation: str,
    scores: list[torch.Tensor],
    importance: list[float] | None,
    stats: list[BlockStats | None],
    sparsity: float,
    temperature: float,
    multiple: int,
    rounding: str,
    reference: bool,
) -> tuple[list[float], list[torch.Tensor]]:
    """Keep fractions and kept channel indices per block."""
    full = [s.numel() for s in scores]
    if allocation == "global":
        if reference:
            kept = alloc.reference_global_kept(scores, sparsity)
        else:
            widths = alloc.global_widths(scores, sparsity, multiple, rounding)
            kept = [alloc.top_channels(s, w) for s, w in zip(scores, widths, strict=True)]
        return [k.numel() / d for k, d in zip(kept, full, strict=True)], kept

    if allocation == "uniform":
        keep = alloc.uniform_keep_fractions(len(scores), sparsity)
        if reference:
            return keep, [alloc.reference_uniform_kept(s, sparsity) for s in scores]
    elif reference:
        sums = [m * s.tokens for m, s in zip(importance, stats, strict=True)]
        keep = alloc.reference_keep_fractions(sums, sparsity)
    else:
        keep = alloc.cfsp_keep_fractions(importance, sparsity, temperature, full)

    if reference:
        widths = alloc.reference_widths(keep, full, multiple)
        return keep, [alloc.reference_kept_channels(s, w) for s, w in zip(scores, widths, strict=True)]
    widths = alloc.widths_from_fractions(keep, full, multiple, rounding)
    return keep, [alloc.top_channels(s, w) for s, w in zip(scores, widths, strict=True)]


def _block_scores(
    mlp: nn.Module, stats: BlockStats | None, metric: str, b: float, c: float, reference: bool
) -> torch.Tensor:
    """Channel scores of one block's MLP from its recorded statistics."""
    gate_up = layouts.input_weights(mlp)  # [gate, up] or [up]
    inputs = ChannelInputs(
        down_weight=layouts.down_projection(mlp).weight,
        up_weight=gate_up[-1],
        gate_weight=gate_up[0] if len(gate_up) == 2 else None,
        stats=stats,
        b=b,
        c=c,
        reference=reference,
    )
    return channel_scores(metric, inputs).cpu()


def _surgery(
    model: nn.Module,
    kept: list[torch.Tensor],
    stats: list[BlockStats | None],
    compensation: str,
    damping: float,
    placement: InMemoryBlocks,
) -> list[torch.Tensor] | None:
    """Slice every block to its kept channels with its compensation; returns the added biases."""
    compensated = compensation != "none"
    with_bias = compensated or bool(getattr(model.config, "mlp_bias", False))
    biases = []
    for index, (block, channels, block_stats) in enumerate(
        zip(decoder_blocks(model), kept, stats, strict=True)
    ):
        placement.onload(index)
        mlp = block_mlp(block)
        fix = compensate(compensation, layouts.down_projection(mlp).weight, channels, block_stats, damping)
        slice_mlp(mlp, channels, fix.bias, with_bias=with_bias, down_weight=fix.weight)
        if block_stats is not None and block_stats.gram is not None and placement.writing:
            block_stats.gram = None  # D x D, no longer needed once the block is written
        placement.offload(index)
        biases.append(fix.bias)
    set_config_widths(model.config, [int(k.numel()) for k in kept], with_bias)
    return biases if compensated else None


def _second_pass(
    model: nn.Module,
    calib: torch.Tensor,
    decided: list[torch.Tensor],
    metric: str,
    b: float,
    c: float,
    compensation: str,
    damping: float,
    batch_size: int,
    progress: bool,
    placement: InMemoryBlocks,
    rechoose: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Prune block by block in a second calibration pass; each block's Gram matrix lives only there.

    ``rechoose`` (the sequential mode): re-choose each block's channels on the activations of the
    already-pruned blocks before it, so later blocks adapt to the error the earlier ones made.
    Widths stay as decided from the dense pass (allocation needs every block's importance first).
    Without ``rechoose`` the channels stay as decided and the next block sees the *dense* output:
    the one-pass refit exactly, with one Gram matrix in memory at a time (streamed models).
    """
    widths = [k.numel() for k in decided]
    compensated = compensation != "none"
    with_bias = compensated or bool(getattr(model.config, "mlp_bias", False))
    kept: list[torch.Tensor] = list(decided)
    biases: list[torch.Tensor] | None = [] if compensated else None

    def prune_block(index: int, stats: BlockStats) -> bool:
        mlp = block_mlp(decoder_blocks(model)[index])
        if rechoose:
            scores = _block_scores(mlp, stats, metric, b, c, False)
            kept[index] = alloc.top_channels(scores, widths[index])
        fix = compensate(compensation, layouts.down_projection(mlp).weight, kept[index], stats, damping)
        if biases is not None:
            biases.append(fix.bias)
        stats.gram = None  # D x D: free it as soon as the block is done
        slice_mlp(mlp, kept[index], fix.bias, with_bias=with_bias, down_weight=fix.weight)
        return rechoose  # True: the next block sees this block's pruned output

    calibrate(
        model,
        calib,
        batch_size=batch_size,
        after_block=prune_block,
        progress=progress,
        second_moments=compensation == "refit",
        placement=placement,
    )
    set_config_widths(model.config, widths, with_bias)
    return kept, biases
