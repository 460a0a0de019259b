"""Block metrics and channel metrics: small pure functions of recorded statistics and weights.

A block metric turns a block's ``BlockStats`` into one number (mean per token); a channel metric
turns the MLP weights and the channel statistics into one score per intermediate channel (higher =
keep). Each is registered by name in a table, so a new criterion is one function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cfsp import config as names
from cfsp import layouts
from cfsp.compensation import refit_weight
from cfsp.errors import CfspError
from cfsp.models import statistics_device
from cfsp.statistics import BlockStats, ExpertStats

# ---------------------------------------------------------------------------------------------
# Block (coarse) metrics: mean over calibration tokens.

BLOCK_METRICS: dict[str, Callable[[BlockStats], float]] = {
    "angular": lambda s: s.angular_sum / s.tokens,
    "cosine": lambda s: s.cosine_sum / s.tokens,
    "mse": lambda s: s.mse_sum / s.tokens,
    "mae": lambda s: s.mae_sum / s.tokens,
    "uniform": lambda s: 1.0,
}


def block_importance(stats: list[BlockStats], metric: str = "angular") -> list[float]:
    """Mean per-token importance of every block under ``metric``."""
    if metric not in BLOCK_METRICS:
        raise CfspError(f"unknown block metric {metric!r}; choose one of {', '.join(BLOCK_METRICS)}")
    return [float(BLOCK_METRICS[metric](s)) for s in stats]


def sublayer_importance(stats: list[BlockStats]) -> tuple[list[float], list[float]]:
    """Mean per-token angular distance across each block's attention sublayer and across its MLP
    sublayer: how far each turns the residual stream (0 for a block without attention)."""
    tokens = [max(s.tokens, 1) for s in stats]
    attention = [s.attention_angular_sum / t for s, t in zip(stats, tokens, strict=True)]
    mlp = [s.mlp_angular_sum / t for s, t in zip(stats, tokens, strict=True)]
    return attention, mlp


# ---------------------------------------------------------------------------------------------
# KV-group metrics: one score per KV group of an attention sublayer (higher = keep), from o_proj's
# weight [H, D] and the statistics of its input (``BlockStats`` with its Gram matrix); each group
# owns ``width = group_size x head_dim`` consecutive input columns.


def group_output_energy(
    out_weight: torch.Tensor, heads: BlockStats, width: int, damping: float
) -> torch.Tensor:
    """``sum_c ||W_o[:, c]||^2 E[x_c^2]`` over the group's columns: its share of the sublayer's output
    energy, cross terms left out. FLAP's channel score (fluctuation times squared column norm)
    with the second moment instead of the variance, since no bias can stand in for a head's mean."""
    weight = out_weight.detach().to(heads.sum_sq.device, torch.float64)
    energy = weight.pow(2).sum(dim=0) * heads.sum_sq / heads.tokens
    return energy.view(-1, width).sum(dim=1)


def group_refit_error(
    out_weight: torch.Tensor, heads: BlockStats, width: int, damping: float
) -> torch.Tensor:
    """The error the o_proj refit (``compensation.refit_weight``, uncentred) leaves when the group
    alone is removed: ``E||W x - W' x_K||^2`` with ``K`` the other groups' columns, from the Gram
    matrix ``G = E[x x^T]``. Unlike the energy it credits what the kept heads can take over (heads
    that attend alike), which is what the refit then does."""
    gram = heads.gram / heads.tokens
    weight = out_weight.detach().to(gram.device, torch.float64)
    columns = torch.arange(gram.shape[0], device=gram.device)
    errors = []
    for group in range(gram.shape[0] // width):
        kept = columns[(columns < group * width) | (columns >= (group + 1) * width)]
        refit = refit_weight(weight, kept, heads, damping, centred=False)
        dense_map, refit_map = weight @ gram, refit @ gram[kept]  # [H, D]: what each correlates with x
        error = (
            (dense_map * weight).sum()
            - 2 * (refit_map * weight).sum()
            + (refit @ gram[kept][:, kept] * refit).sum()
        )
        errors.append(error)
    return torch.stack(errors)


KV_GROUP_METRICS: dict[str, Callable[[torch.Tensor, BlockStats, int, float], torch.Tensor]] = {
    "refit": group_refit_error,
    "energy": group_output_energy,
}


def kv_group_scores(
    metric: str, out_weight: torch.Tensor, heads: BlockStats, width: int, damping: float
) -> torch.Tensor:
    """Score every KV group of one attention sublayer (float64, higher = more important)."""
    if metric not in KV_GROUP_METRICS:
        raise CfspError(f"unknown KV-group metric {metric!r}; choose one of {', '.join(KV_GROUP_METRICS)}")
    return KV_GROUP_METRICS[metric](out_weight, heads, width, damping)


# ---------------------------------------------------------------------------------------------
# Channel (fine) metrics.


@dataclass
class ChannelInputs:
    """Everything a channel metric may use, as [H, D] weights (rows = hidden units) and [D] stats."""

    down_weight: torch.Tensor  # down projection weight  [H, D], in the model's dtype and device
    up_weight: torch.Tensor  # up projection weight      [D, H]
    gate_weight: torch.Tensor | None  # gate weight      [D, H]; None for a plain (ungated) MLP
    stats: BlockStats
    weight_activation_exponent: float = 1.0  # the paper's b
    activation_exponent: float = 1.0  # the paper's c
    window_fluctuation: bool = False  # FLAP's reference recurrence over windows, not the variance

    # The float64 [H, D] views are made on each use, not held: three float64 copies of a wide
    # block's matrices (400 MB at Llama-3.2-1B's shape) would dominate a streamed run's memory.

    def _as_float64(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().to(statistics_device(weight.device), torch.float64)

    @property
    def down(self) -> torch.Tensor:
        return self._as_float64(self.down_weight)

    @property
    def up(self) -> torch.Tensor:
        return self._as_float64(self.up_weight).T

    @property
    def gate(self) -> torch.Tensor | None:
        return None if self.gate_weight is None else self._as_float64(self.gate_weight).T

    def inputs(self) -> list[torch.Tensor]:
        """Up and (if the MLP is gated) gate as float64 [H, D]: the matrices that make a channel."""
        gate = self.gate
        return [self.up] + ([] if gate is None else [gate])

    def weights(self) -> list[torch.Tensor]:
        """Down, up and gate (if any) as float64 [H, D]: every matrix a channel touches."""
        return [self.down, *self.inputs()]

    @property
    def act_norm(self) -> torch.Tensor:
        """``A_j = sqrt(sum_t x_j^2 / N)``: per-window-averaged sum of squares, as the reference."""
        return (self.stats.sum_sq / self.stats.windows).sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.stats.sum / self.stats.tokens

    @property
    def fluctuation(self) -> torch.Tensor:
        """Per-channel input fluctuation for FLAP: plain variance, or the reference recurrence."""
        if self.window_fluctuation:
            return reference_fluctuation(self.stats)
        mean = self.mean
        return (self.stats.sum_sq / self.stats.tokens - mean.pow(2)).clamp_min(0.0)


def reference_fluctuation(stats: BlockStats) -> torch.Tensor:
    """FLAP's reference statistic: a per-window recurrence, not the variance."""
    mean = torch.zeros_like(stats.sum)
    fluct = torch.zeros_like(stats.sum)
    for n, (wsum, wsq, count) in enumerate(
        zip(stats.window_sum, stats.window_sum_sq, stats.window_tokens, strict=True)
    ):
        window_mean = wsum / count
        mean = mean * n / (n + 1) + window_mean / (n + 1)
        if n == 0:
            fluct = torch.zeros_like(fluct)
        else:
            # sum_t (x_t - mean)^2 from the window's sums, with the already-updated running mean
            squared_dev = wsq - 2 * mean * wsum + count * mean.pow(2)
            fluct = fluct * (n - 1) / n + squared_dev / (n + 1)
    return fluct


def _colsum_normalised(weight: torch.Tensor) -> torch.Tensor:
    """|W| divided by its column sum (over hidden units): each column sums to one."""
    magnitude = weight.abs()
    return magnitude / magnitude.sum(dim=0, keepdim=True)


def cfsp_paper(w: ChannelInputs) -> torch.Tensor:
    """The paper's (and the reference's default) score: the three weight matrices column-normalised,
    down_proj's weighted by ``A^b``, times ``A^c``. Ranks exactly as ``A^c`` (every term is
    column-normalised)."""
    act = w.act_norm
    weighted_down = w.down.abs() * act.pow(w.weight_activation_exponent)
    m = _colsum_normalised(weighted_down)
    for weight in w.inputs():
        m = m + _colsum_normalised(weight)
    return (m * act.pow(w.activation_exponent)).mean(dim=0)


def cfsp_paper_unweighted(w: ChannelInputs) -> torch.Tensor:
    """Three column-normalised weights times ``A^c`` (the down weight not activation-weighted)."""
    m = sum(_colsum_normalised(weight) for weight in w.weights())
    return (m * w.act_norm.pow(w.activation_exponent)).mean(dim=0)


def cfsp_paper_down(w: ChannelInputs) -> torch.Tensor:
    """The activation-weighted down term alone, column-normalised, times ``A^c``."""
    act = w.act_norm
    weighted_down = w.down.abs() * act.pow(w.weight_activation_exponent)
    return (_colsum_normalised(weighted_down) * act.pow(w.activation_exponent)).mean(dim=0)


def activation(w: ChannelInputs) -> torch.Tensor:
    """Activation magnitude alone: ``A^c``."""
    return w.act_norm.pow(w.activation_exponent)


def ria(w: ChannelInputs) -> torch.Tensor:
    """Relative importance: each weight relative to its row (competing channels) and its column.

    ``mean_i(|W_ij| / r_i + |W_ij| / c_j) * A_j^c`` summed over down, up and gate (if any), with row sums
    ``r`` and column sums ``c``. Unlike ``cfsp_paper`` the row term varies between channels,
    so the weights matter. Written as a matrix-vector product (row term) and ``c_j / c_j`` (the
    column term: 1, or NaN for an all-zero column as the elementwise form gives), it needs one
    [H, D] temporary per matrix and a few passes instead of a dozen.
    """
    total = torch.zeros(w.down.shape[1], dtype=w.down.dtype, device=w.down.device)
    for weight in w.weights():
        magnitude = weight.abs()
        column = magnitude.sum(dim=0)
        total += (magnitude.T @ magnitude.sum(dim=1).reciprocal() + column / column) / weight.shape[0]
    return total * w.act_norm.pow(w.activation_exponent)


def wanda_base(w: ChannelInputs) -> torch.Tensor:
    """Wanda-SP: ``mean_i |Wd_ij| * A_j``."""
    return (w.down.abs() * w.act_norm).mean(dim=0)


def mag_base(w: ChannelInputs) -> torch.Tensor:
    """Magnitude-SP: L2 norm of the down-projection column; needs no activations."""
    return w.down.norm(dim=0)


def flap(w: ChannelInputs) -> torch.Tensor:
    """FLAP: input fluctuation times the squared down-projection column norm."""
    return w.fluctuation * w.down.pow(2).sum(dim=0)


CHANNEL_METRICS: dict[str, Callable[[ChannelInputs], torch.Tensor]] = {
    "cfsp_paper": cfsp_paper,
    "cfsp_paper_unweighted": cfsp_paper_unweighted,
    "cfsp_paper_down": cfsp_paper_down,
    "activation": activation,
    "ria": ria,
    "wanda_base": wanda_base,
    "mag_base": mag_base,
    "flap": flap,
}

# ---------------------------------------------------------------------------------------------
# Expert metrics: one score per routed expert of a mixture-of-experts block (higher = keep). An
# expert the calibration never routed to scores 0, below every routed one.


def reap(s: ExpertStats, index: int) -> torch.Tensor:
    """REAP: the mean, over the tokens routed to the expert, of its routing weight times the norm
    of its output; what removing the expert takes out of those tokens' block output."""
    return s.saliency_sum / s.routed.clamp_min(1)


def frequency(s: ExpertStats, index: int) -> torch.Tensor:
    """How often the router chose the expert."""
    return s.routed.clone()


def gate_mass(s: ExpertStats, index: int) -> torch.Tensor:
    """The summed routing weight the expert received."""
    return s.gate_mass.clone()


def random_experts(s: ExpertStats, index: int) -> torch.Tensor:
    """A control: a fixed random order per block (seeded by the block index)."""
    generator = torch.Generator().manual_seed(index)
    return torch.rand(s.routed.numel(), generator=generator, dtype=torch.float64).to(s.routed.device)


EXPERT_METRICS: dict[str, Callable[[ExpertStats, int], torch.Tensor]] = {
    "reap": reap,
    "frequency": frequency,
    "gate_mass": gate_mass,
    "random": random_experts,
}


def expert_scores(metric: str, stats: ExpertStats, index: int) -> torch.Tensor:
    """Score every routed expert of block ``index`` (float64, higher = more important)."""
    if metric not in EXPERT_METRICS:
        raise CfspError(f"unknown expert metric {metric!r}; choose one of {', '.join(EXPERT_METRICS)}")
    scores = EXPERT_METRICS[metric](stats, index)
    if not torch.isfinite(scores).all():
        raise CfspError(
            f"NaN or inf in the expert scores of block {index}; load the model in float32 or bfloat16"
        )
    return scores


def expert_channel_scores(s: ExpertStats) -> torch.Tensor:
    """[E, I]: each channel of each routed expert by what it adds to the block output over the
    tokens routed to the expert: the norm of its down column times the root of its summed squared,
    routing-weighted activation (REAP's expert saliency, taken per channel)."""
    return s.channel_energy.sqrt() * s.down_norms


# The config lists every registered name without importing this module (cfsp.config).
for _table, _listed in (
    (BLOCK_METRICS, names.BLOCK_METRICS),
    (CHANNEL_METRICS, names.CHANNEL_METRICS),
    (KV_GROUP_METRICS, names.KV_GROUP_METRICS),
    (EXPERT_METRICS, names.EXPERT_METRICS),
):
    if tuple(_table) != _listed:
        raise ImportError(
            f"scoring registers {tuple(_table)} but cfsp.config lists {_listed}; list it there too"
        )


def channel_scores(metric: str, inputs: ChannelInputs) -> torch.Tensor:
    """Score every intermediate channel of one block (float64, higher = more important)."""
    if metric not in CHANNEL_METRICS:
        raise CfspError(f"unknown channel metric {metric!r}; choose one of {', '.join(CHANNEL_METRICS)}")
    scores = CHANNEL_METRICS[metric](inputs)
    if not torch.isfinite(scores).all():
        raise CfspError(
            "NaN or inf in channel scores; the activations overflowed: load the model in float32 or bfloat16"
        )
    return scores


def block_scores(mlp: nn.Module, stats: BlockStats | None, config: names.PruneConfig) -> torch.Tensor:
    """Channel scores of one block's MLP from its recorded statistics, as ``config`` says."""
    gate_up = layouts.input_weights(mlp)  # [gate, up] or [up]
    inputs = ChannelInputs(
        down_weight=layouts.down_projection(mlp).weight,
        up_weight=gate_up[-1],
        gate_weight=gate_up[0] if len(gate_up) == 2 else None,
        stats=stats,
        weight_activation_exponent=config.weight_activation_exponent,
        activation_exponent=config.activation_exponent,
        window_fluctuation=config.fluctuation == "windows",
    )
    return channel_scores(config.channel_metric, inputs)
