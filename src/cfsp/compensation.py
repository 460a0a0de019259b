"""What replaces the removed channels' contribution to a block's output.

``none`` drops it. ``mean`` (FLAP's bias) adds the pruned channels' average output to down_proj's
bias. ``refit`` re-solves down_proj on the kept channels by ridge least squares so that the pruned
block reproduces the dense block's output on the calibration tokens as well as a linear map can:

    W_K', c = argmin E || W x - (W_K' x_K + c) ||^2 + lam ||W_K'||^2

With mean ``mu`` and centred covariance ``C`` of the down_proj input ``x`` (from the calibration
pass), ``W_K' = W C[:, K] (C[K, K] + lam I)^-1`` and ``c = W mu - W_K' mu_K``. ``lam`` is
``damping`` times the mean diagonal of ``C[K, K]`` (as GPTQ's percdamp). Keeping ``W_K' = W_K``
gives ``c = W_P mu_P``: mean compensation is the refit that refits nothing but the bias.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cfsp.config import COMPENSATIONS
from cfsp.errors import CfspError
from cfsp.statistics import BlockStats

REFIT_MIN_TOKENS_PER_CHANNEL = 4
log = logging.getLogger("cfsp")


@dataclass
class Compensation:
    """The new pieces of one block: a replacement down_proj weight [H, k], a bias to add to it [H],
    and a replacement o_proj weight for the kept heads' columns (KV-group cuts)."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    out_weight: torch.Tensor | None = None


def mean_bias(down: torch.Tensor, kept: torch.Tensor, stats: BlockStats, damping: float, intercept: bool):
    """FLAP's rule: the pruned channels' mean output goes into the bias."""
    pruned = torch.ones(down.shape[1], dtype=torch.bool, device=down.device)
    pruned[kept] = False
    return Compensation(bias=down[:, pruned] @ (stats.sum[pruned] / stats.tokens))


def refit(down: torch.Tensor, kept: torch.Tensor, stats: BlockStats, damping: float, intercept: bool):
    """Ridge least squares on the kept channels (the module docstring); without ``intercept`` on
    uncentred moments and with no bias."""
    if not stats.has_gram:
        raise CfspError("compensation 'refit' needs second moments: calibrate with second_moments=True")
    weight = refit_weight(down, kept, stats, damping, centred=intercept)
    if not intercept:
        return Compensation(weight=weight)
    mean = stats.sum / stats.tokens
    return Compensation(weight=weight, bias=down @ mean - weight @ mean[kept])


# A rule: (dense down_proj weight [H, D] in float64, kept channels, statistics, damping, intercept)
# -> Compensation. "reconstruct" slices with the refit, then trains (cfsp.reconstruction).
RULES: dict[str, Callable[..., Compensation]] = {"mean": mean_bias, "refit": refit}
if set(RULES) | {"none", "reconstruct"} != set(COMPENSATIONS):
    raise ImportError(
        f"compensation rules {sorted(RULES)} differ from cfsp.config.COMPENSATIONS; list them there"
    )


def compensate(
    rule: str,
    down: torch.Tensor,
    kept: torch.Tensor,
    stats: BlockStats | None,
    damping: float,
    intercept: bool = True,
) -> Compensation:
    """Apply ``rule`` to one block; ``down`` is the dense down_proj weight [H, D].

    ``intercept=False`` (a stock checkpoint whose MLP has no bias) solves the refit on uncentred
    second moments, so the best linear map without a bias: ``W G[:, K] (G[K, K] + lam I)^-1`` with
    ``G = E[x x^T]``.
    """
    if rule == "none":
        return Compensation()
    if rule not in RULES:
        raise CfspError(f"unknown compensation {rule!r}; choose one of {', '.join(COMPENSATIONS)}")
    if stats is None or stats.sum is None:
        raise CfspError(f"compensation {rule!r} needs calibration statistics")
    down = down.detach().to(stats.sum.device, torch.float64)
    return RULES[rule](down, kept.to(down.device), stats, damping, intercept)


def refit_out_projection(
    out_weight: torch.Tensor, kept: torch.Tensor, heads: BlockStats, damping: float
) -> torch.Tensor | None:
    """o_proj re-solved on the input columns of the kept heads (uncentred: o_proj has no bias to
    take a mean), or None, keeping the columns as they are, when there are too few tokens."""
    if not heads.has_gram or refit_or_mean(heads.tokens, kept.numel(), "plain slicing") != "refit":
        return None
    weight = out_weight.detach().to(heads.sum.device, torch.float64)
    return refit_weight(weight, kept.to(weight.device), heads, damping, centred=False)


def centred_covariance(stats: BlockStats) -> torch.Tensor:
    """``E[x x^T] - mu mu^T`` of the down_proj input over the calibration tokens (float64)."""
    mean = stats.sum / stats.tokens
    return stats.gram / stats.tokens - torch.outer(mean, mean)


def refit_weight(
    down: torch.Tensor, kept: torch.Tensor, stats: BlockStats, damping: float, centred: bool = True
) -> torch.Tensor:
    """Ridge least-squares down_proj on the kept channels: ``W C[:, K] (C[K, K] + lam I)^-1``, with
    the centred covariance (a bias absorbs the mean) or, ``centred=False``, the uncentred moments."""
    cov = (centred_covariance(stats) if centred else stats.gram / stats.tokens).to(down.device)
    cov_kk = cov[kept][:, kept]
    lam = damping * cov_kk.diagonal().mean().clamp_min(1e-12)
    system = cov_kk + lam * torch.eye(kept.numel(), dtype=cov.dtype, device=cov.device)
    rhs = (down @ cov[:, kept]).T  # [k, H]
    return torch.linalg.solve(system, rhs).T


def refit_or_mean(tokens: int, kept_channels: int, fallback: str = "mean") -> str:
    """The refit solves for ``kept_channels`` weights per output from ``tokens`` samples; with too
    few it fits the calibration noise (``benchmarks/results/refit_tokens.md``, SmolLM2 at 50 %, two
    seeds: 0.7 tokens per kept channel of the widest block gave a perplexity of 13,415 against
    91.6 with the mean bias, 1.3 gave +76 %, 2.7 about even, 5.3 -13 %, and 32 x 512 tokens
    -19 %), so below ``REFIT_MIN_TOKENS_PER_CHANNEL`` the mean bias is used, with a warning
    (``fallback``: ``none`` where the output may not gain a bias)."""
    needed = REFIT_MIN_TOKENS_PER_CHANNEL * kept_channels
    if tokens >= needed:
        return "refit"
    log.warning(
        f"the refit needs at least {needed:,} calibration tokens for blocks that keep {kept_channels:,} "
        f"channels, got {tokens:,}; using the {fallback} compensation instead (calibrate on more tokens: "
        "--nsamples x --seqlen)"
    )
    return fallback
