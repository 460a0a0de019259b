"""From scores to widths: per-block keep fractions, rounding to a multiple, and kept channels.

Three allocation rules: ``cfsp`` (sigmoid of block importance), ``uniform`` (the
same fraction everywhere) and ``global`` (Wanda-SP / FLAP: standardise scores per block, one
threshold over all blocks).
"""

from __future__ import annotations

import logging
import math

import torch

from cfsp.config import DEFAULT_TEMPERATURE, PruneConfig
from cfsp.errors import CfspError

log = logging.getLogger("cfsp")

_SHRINK_MARGIN = 1.05


def cfsp_keep_fractions(
    importance: list[float],
    sparsity: float,
    temperature: float = DEFAULT_TEMPERATURE,
    widths: list[int] | None = None,
) -> list[float]:
    """Fraction of FFN channels each block keeps: ``sigmoid(tau * (I - mean I))``, rescaled to 1 - p.

    If the most important block would keep more than everything, the spread of the sigmoids around
    their mean is shrunk first (the reference's rule, with its 1.05 margin). ``widths``: the blocks'
    FFN widths where they differ (Gemma 4's double-wide layers), so that the kept channels, not
    the mean fraction, come to 1 - p of the total.
    """
    values = torch.tensor(importance, dtype=torch.float64)
    logits = temperature * (values - values.mean())
    return _sigmoid_keep(logits, sparsity, widths)


def reference_keep_fractions(importance_sums: list[float], sparsity: float) -> list[float]:
    """The reference's own numerics: importance summed over tokens, logits divided by 1e4."""
    values = torch.tensor(importance_sums, dtype=torch.float64)
    logits = (values - values.mean()) / 1e4
    return _sigmoid_keep(logits, sparsity)


def _sigmoid_keep(logits: torch.Tensor, sparsity: float, widths: list[int] | None = None) -> list[float]:
    s = torch.sigmoid(logits)
    if widths is None or len(set(widths)) == 1:
        mean = torch.mean  # equal widths: the reference's plain mean, bit for bit
    else:
        share = torch.tensor(widths, dtype=torch.float64) / sum(widths)

        def mean(values: torch.Tensor) -> torch.Tensor:
            return (values * share).sum()

    avg = mean(s)
    if s.max() / avg * (1 - sparsity) >= 1:
        k = avg * (1 / (1 - sparsity) - 1) / (s.max() - avg) / _SHRINK_MARGIN
        s = avg + (s - avg) * k
        avg = mean(s)
    return (s / avg * (1 - sparsity)).tolist()


def uniform_keep_fractions(num_blocks: int, sparsity: float) -> list[float]:
    return [1.0 - sparsity] * num_blocks


def round_width(width: float, full: int, multiple: int) -> int:
    """Round a width to the nearest multiple; never 0 (one multiple, or full if smaller), never > full."""
    rounded = math.floor(width / multiple + 0.5) * multiple
    return int(min(full, max(rounded, min(multiple, full))))


def widths_from_fractions(
    keep: list[float], full: list[int], multiple: int = 128, rounding: str = "budget"
) -> list[int]:
    return round_widths([f * d for f, d in zip(keep, full, strict=True)], full, multiple, rounding)


def round_widths(targets: list[float], full: list[int], multiple: int, rounding: str = "budget") -> list[int]:
    """Round per-block target widths to the multiple.

    ``nearest`` rounds each block on its own (the reference): with 30 blocks the errors add up and
    the realised sparsity can miss the target by several multiples. ``budget`` keeps the total as
    close to the sum of the targets as the multiple allows: every block is rounded down, then the
    blocks with the largest remainders get one more multiple until the total is reached.
    """
    if rounding != "budget" or multiple == 1:
        return [round_width(t, d, multiple) for t, d in zip(targets, full, strict=True)]
    widths = [
        round_width(math.floor(t / multiple) * multiple, d, multiple)
        for t, d in zip(targets, full, strict=True)
    ]
    missing = sum(targets) - sum(widths)
    order = sorted(range(len(widths)), key=lambda i: targets[i] - widths[i], reverse=True)
    for i in order:
        step = min(multiple, full[i] - widths[i])
        if step > 0 and missing >= step / 2:
            widths[i] += step
            missing -= step
    return widths


def reference_widths(keep: list[float], full: list[int], multiple: int) -> list[int]:
    """The reference's widths: round-half-up to the multiple, or ``int(D * keep) + 1`` when unrounded.

    A width of 0 means "keep everything" in the reference (see ``reference_kept_channels``).
    """
    if multiple > 1:
        return [math.floor(d * f / multiple + 0.5) * multiple for f, d in zip(keep, full, strict=True)]
    return [int(d * f) + 1 for f, d in zip(keep, full, strict=True)]


def top_channels(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the ``width`` highest scores, sorted ascending (exactly ``width`` channels)."""
    return torch.topk(scores, width, sorted=False).indices.sort().values


def reference_kept_channels(scores: torch.Tensor, width: int) -> torch.Tensor:
    """The reference's selection: threshold at the width-th score with ``>=`` (ties keep more).

    Width 0 keeps every channel, as in the reference.
    """
    if width <= 0:
        return torch.arange(scores.numel())
    threshold = scores.sort(descending=True).values[min(width, scores.numel()) - 1]
    return torch.nonzero(scores >= threshold).flatten()


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with torch's unbiased std, so blocks compete on one scale."""
    return (scores - scores.mean()) / scores.std()


def global_widths(
    block_scores: list[torch.Tensor], sparsity: float, multiple: int = 1, rounding: str = "budget"
) -> list[int]:
    """Widths from one threshold over the per-block standardised scores of every block.

    Keeps ``round(total * (1 - p))`` channels overall (within one channel of the request), at least
    one per block; with ``multiple > 1`` the counts are then rounded to the multiple (``round_widths``).
    """
    standard = [standardise(s) for s in block_scores]
    flat = torch.cat(standard)
    keep_total = max(1, round(flat.numel() * (1 - sparsity)))
    threshold_index = torch.topk(flat, keep_total).indices
    owner = torch.repeat_interleave(
        torch.arange(len(block_scores)), torch.tensor([s.numel() for s in block_scores])
    )
    counts = torch.bincount(owner[threshold_index], minlength=len(block_scores)).tolist()
    full = [s.numel() for s in block_scores]
    return round_widths([float(c) for c in counts], full, multiple, rounding)


def reference_global_kept(block_scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Wanda-SP / FLAP reference: threshold at sorted index ``int(total * (1 - p))``, keep ``> t``."""
    standard = [standardise(s) for s in block_scores]
    flat = torch.cat(standard).sort(descending=True).values
    threshold = flat[min(int(flat.numel() * (1 - sparsity)), flat.numel() - 1)]
    return [torch.nonzero(s > threshold).flatten() for s in standard]


def reference_uniform_kept(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Magnitude-SP reference: keep scores ``>=`` the ascending-sorted score at ``int(D * p)``."""
    threshold = scores.sort().values[int(scores.numel() * sparsity)]
    return torch.nonzero(scores >= threshold).flatten()


def allocate(
    config: PruneConfig,
    scores: list[torch.Tensor],
    importance: list[float] | None,
    tokens: list[int] | None,
) -> tuple[list[float], list[torch.Tensor]]:
    """Keep fractions and kept channel indices per block, as ``config`` says, from the channel
    scores, the block importance (mean per token) and each block's calibration token count."""
    full = [s.numel() for s in scores]
    sparsity, multiple, rounding = config.sparsity, config.multiple, config.rounding
    threshold = config.selection == "threshold"
    if config.allocation == "global":
        if threshold:
            kept = reference_global_kept(scores, sparsity)
        else:
            widths = global_widths(scores, sparsity, multiple, rounding)
            kept = [top_channels(s, w) for s, w in zip(scores, widths, strict=True)]
        return [k.numel() / d for k, d in zip(kept, full, strict=True)], kept

    if config.allocation == "uniform":
        keep = uniform_keep_fractions(len(scores), sparsity)
        if threshold:
            return keep, [reference_uniform_kept(s, sparsity) for s in scores]
    elif config.importance_scale == "sum":
        keep = reference_keep_fractions([m * t for m, t in zip(importance, tokens, strict=True)], sparsity)
    else:
        keep = cfsp_keep_fractions(importance, sparsity, config.temperature, full)

    if rounding == "reference":
        widths = reference_widths(keep, full, multiple)
    else:
        widths = widths_from_fractions(keep, full, multiple, rounding)
    choose = reference_kept_channels if threshold else top_channels
    return keep, [choose(s, w) for s, w in zip(scores, widths, strict=True)]


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
