"""``PruneConfig``: every pruning option, its default, its help text and its check, in one place.

``prune`` takes one; the plan records its dict; the command line builds its flags' help and its
validation from it. Options left as None are filled when the config is made: first from the
method's table entry (``cfsp.methods``), then from the preset. The ``reference`` preset is the
reference implementation's numerics, as values of the options below, not a flag that every step
checks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from cfsp import allocation as alloc
from cfsp.compensation import COMPENSATIONS, DEFAULT_DAMPING
from cfsp.errors import CfspError
from cfsp.methods import ALLOCATIONS, get_method
from cfsp.scoring import BLOCK_METRICS, CHANNEL_METRICS, KV_GROUP_METRICS, NEEDS_ACTIVATIONS

PRESETS = ("default", "reference")
SELECTIONS = ("topk", "threshold")
IMPORTANCE_SCALES = ("mean", "sum")
FLUCTUATIONS = ("variance", "windows")
# What the reference implementation does where cfsp's defaults differ (README: "Where cfsp
# deliberately differs"); applied to every option the caller left unset.
REFERENCE_PRESET = dict(
    rounding="reference", selection="threshold", importance_scale="sum", fluctuation="windows"
)
RECONSTRUCT_TARGETS = ("mlp", "block")
RECONSTRUCT_INPUTS = ("dense", "pruned")
SCHEDULES = ("cosine", "constant")
DEFAULT_PRESET = dict(rounding="budget", selection="topk", importance_scale="mean", fluctuation="variance")


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PruneConfig:
    """How to prune: validated and completed on creation, so a bad value fails before any work."""

    sparsity: float = _option(0.5, "Fraction of FFN channels to remove, in (0, 1).")
    method: str = _option("cfsp", "cfsp, wanda-sp, flap or magnitude-sp.")
    preset: str = _option("default", "default, or reference: the reference implementation's numerics.")
    block_metric: str = _option("angular", "Block importance: angular, cosine, mse, mae or uniform.")
    channel_metric: str | None = _option(None, "Channel score (default: the method's).")
    allocation: str | None = _option(
        None, "Widths per block: cfsp, uniform or global (default: the method's)."
    )
    temperature: float = _option(alloc.DEFAULT_TEMPERATURE, "CFSP allocation temperature.")
    b: float = _option(1.0, "Activation exponent inside the weight term.")
    c: float = _option(1.0, "Activation exponent of the channel score.")
    multiple: int | None = _option(None, "Round widths to this multiple (1 = off; default: the method's).")
    rounding: str | None = _option(
        None, "budget: hit the target sparsity overall; nearest: round each block alone; reference: half-up."
    )
    selection: str | None = _option(None, "topk: exactly the width; threshold: the reference's score cut.")
    importance_scale: str | None = _option(
        None, "mean: per-token importance (temperature as given); sum: the reference's summed importance."
    )
    fluctuation: str | None = _option(
        None, "FLAP's statistic: variance, or the reference's per-window recurrence."
    )
    compensation: str | None = _option(
        None,
        "none, mean (pruned channels' mean output in the bias), refit (least squares) or reconstruct "
        "(the refit, then each pruned MLP trained to the dense outputs).",
    )
    refit_damping: float = _option(
        DEFAULT_DAMPING, "Ridge damping of the refit, relative to the mean variance."
    )
    reconstruct_epochs: int = _option(2, "reconstruct: passes over the calibration tokens per block.")
    reconstruct_lr: float = _option(1e-3, "reconstruct: Adam learning rate.")
    reconstruct_batch_tokens: int = _option(256, "reconstruct: tokens per training step.")
    reconstruct_target: str = _option(
        "block", "reconstruct: aim at the dense block's output (block) or the dense MLP's output (mlp)."
    )
    reconstruct_inputs: str = _option(
        "pruned", "reconstruct: train on the pruned model's MLP inputs (pruned) or the dense model's (dense)."
    )
    reconstruct_holdout: float = _option(
        0.125, "reconstruct: share of calibration windows held out to pick the epoch and stop early."
    )
    reconstruct_schedule: str = _option("cosine", "reconstruct: learning-rate schedule, cosine or constant.")
    uniform: bool = _option(
        False,
        "Every block keeps the same width (one multiple): a stock checkpoint that every engine serves, "
        "without per-block widths, remote code or MLP biases.",
    )
    drop_attention: float | str = _option(
        0,
        "Attention sublayers to remove: a count (2) or a share of the blocks (0.1), those that turn the "
        "residual stream least on the calibration tokens; their blocks keep the MLP. auto: with "
        "--total-sparsity, try 0, 1, 2, 4, ... and keep the count with the lowest held-out loss.",
    )
    kv_groups: int = _option(
        0,
        "KV groups (a KV head and the query heads that read it) to remove from every attention sublayer "
        "that stays, the lowest-scoring by kv_group_metric on the calibration tokens; o_proj is refit on "
        "the kept heads unless --compensation is none or mean. The KV cache loses as many KV heads.",
    )
    kv_group_metric: str = _option(
        "refit",
        "KV-group score: refit (the error the o_proj refit leaves without the group) or energy (the "
        "group's share of o_proj's output).",
    )
    total_sparsity: float | None = _option(
        None,
        "Budget mode: the share of all parameters to remove; the FFN sparsity is derived from it after "
        "the attention cuts (dropped sublayers, KV groups) are counted (replaces --sparsity).",
    )
    sequential: bool = _option(False, "Score each block on the already-pruned blocks' outputs.")
    allow_inexact: bool = _option(False, "Warn instead of failing when the widths miss the sparsity.")
    batch_size: int = _option(8, "Windows per forward batch during calibration.")
    offload_activations: bool = _option(False, "Keep calibration activations on the CPU between blocks.")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise CfspError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        spec = get_method(self.method)
        reference = self.preset == "reference"
        method_defaults = dict(
            channel_metric=spec.channel_metric,
            allocation=spec.allocation,
            multiple=spec.multiple,
            compensation=spec.compensation,
        )
        if reference:
            method_defaults.update(spec.reference_defaults)
        if self.uniform:  # one width everywhere, rounded per block to the nearest multiple
            if self.allocation not in (None, "uniform"):
                raise CfspError(
                    f"--uniform gives every block the same width; drop --allocation {self.allocation}"
                )
            method_defaults.update(allocation="uniform", selection="topk", rounding="nearest")
        for name, value in {**(REFERENCE_PRESET if reference else DEFAULT_PRESET), **method_defaults}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._check()

    def _check(self) -> None:
        numbers = (
            "sparsity",
            "temperature",
            "b",
            "c",
            "refit_damping",
            "reconstruct_lr",
            "reconstruct_holdout",
        )
        for name in numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise CfspError(f"{name} must be a finite number, got {value}")
        if not 0.0 < float(self.sparsity) < 1.0:
            raise CfspError(
                f"sparsity must be in (0, 1), got {self.sparsity}; e.g. 0.5 removes half the FFN channels"
            )
        choices = (
            ("block metric", self.block_metric, BLOCK_METRICS),
            ("channel metric", self.channel_metric, CHANNEL_METRICS),
            ("allocation", self.allocation, ALLOCATIONS),
            ("rounding", self.rounding, alloc.ROUNDINGS),
            ("selection", self.selection, SELECTIONS),
            ("importance scale", self.importance_scale, IMPORTANCE_SCALES),
            ("fluctuation", self.fluctuation, FLUCTUATIONS),
            ("compensation", self.compensation, COMPENSATIONS),
            ("reconstruction target", self.reconstruct_target, RECONSTRUCT_TARGETS),
            ("reconstruction inputs", self.reconstruct_inputs, RECONSTRUCT_INPUTS),
            ("learning-rate schedule", self.reconstruct_schedule, SCHEDULES),
            ("KV-group metric", self.kv_group_metric, KV_GROUP_METRICS),
        )
        for what, value, allowed in choices:
            if value not in allowed:
                raise CfspError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        self.multiple = int(self.multiple)
        if self.multiple < 1:
            raise CfspError(f"multiple must be >= 1 (1 = no rounding), got {self.multiple}")
        if self.temperature < 0:
            raise CfspError(f"temperature must be >= 0, got {self.temperature}")
        if self.batch_size < 1:
            raise CfspError(f"batch size must be >= 1, got {self.batch_size}")
        if self.refit_damping < 0:
            raise CfspError(f"refit damping must be >= 0, got {self.refit_damping}")
        for name in ("reconstruct_epochs", "reconstruct_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CfspError(f"{name} must be a whole number >= 1, got {value}")
        if self.reconstruct_lr <= 0:
            raise CfspError(f"reconstruct_lr must be > 0, got {self.reconstruct_lr}")
        if not 0.0 <= self.reconstruct_holdout <= 0.5:
            raise CfspError(
                f"reconstruct_holdout must be in [0, 0.5] (a share of the calibration windows), got "
                f"{self.reconstruct_holdout}"
            )
        if self.uniform and (
            self.compensation == "mean" or self.selection != "topk" or self.rounding == "budget"
        ):
            raise CfspError(
                "--uniform writes a stock checkpoint, whose MLP has no bias and whose blocks share one exact "
                "width: use --compensation refit (solved without a bias), reconstruct or none, and the default channel "
                "selection and rounding"
            )
        self._check_drop_attention()
        if self.drop_attention and self.uniform:
            raise CfspError(
                "--uniform writes a stock checkpoint, in which every block has its attention; drop "
                "--drop-attention or --uniform"
            )
        if isinstance(self.kv_groups, bool) or not isinstance(self.kv_groups, int) or self.kv_groups < 0:
            raise CfspError(
                f"kv_groups must be a whole count >= 0 (1 removes one KV group per sublayer), got {self.kv_groups}"
            )
        cuts = [
            flag
            for flag, value in (("--drop-attention", self.drop_attention), ("--kv-groups", self.kv_groups))
            if value
        ]
        if cuts and self.compensation == "reconstruct":
            raise CfspError(
                "--compensation reconstruct trains each MLP on the dense attention's outputs and cannot be "
                f"combined with {' or '.join(cuts)}; use --compensation refit"
            )
        if self.total_sparsity is not None and (
            isinstance(self.total_sparsity, bool)
            or not isinstance(self.total_sparsity, int | float)
            or not 0.0 < self.total_sparsity < 1.0
        ):
            raise CfspError(
                f"total_sparsity must be in (0, 1), got {self.total_sparsity}; e.g. 0.15 removes 15 % of all "
                "parameters"
            )
        if self.sequential and self.preset == "reference":
            raise CfspError(
                "--sequential cannot be combined with --reference (the reference has no such mode)"
            )

    def _check_drop_attention(self) -> None:
        value = self.drop_attention
        if value == "auto":
            if self.total_sparsity is None:
                raise CfspError(
                    "--drop-attention auto chooses how a parameter budget is split between attention and "
                    "FFN: give the budget with --total-sparsity"
                )
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (value >= 1 and value != int(value))
        ):
            raise CfspError(
                f"drop_attention must be a whole count (2), a share of the blocks in (0, 1) (0.1) or auto, "
                f"got {value}"
            )

    @classmethod
    def from_options(cls, base: float | PruneConfig | None = None, **options) -> PruneConfig:
        """A config from ``prune``'s keywords (``reference=True`` is the reference preset); ``base``
        is the sparsity, or an existing config whose options the keywords replace."""
        if "bias_compensation" in options:
            raise CfspError(
                "bias_compensation is gone; use compensation='mean' (True) or compensation='none' (False)"
            )
        if "reference" in options:
            options["preset"] = "reference" if options.pop("reference") else options.get("preset", "default")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise CfspError(
                f"unknown pruning option(s) {', '.join(unknown)}; the options are {', '.join(known)}"
            )
        if isinstance(base, PruneConfig):
            return replace(base, **options) if options else base
        if base is not None:
            options["sparsity"] = base
        return cls(**options)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_calibration(self) -> bool:
        """Activation-based scores, importance-based allocation, every compensation and the
        attention cuts read the calibration pass; Magnitude-SP without compensation needs none."""
        return (
            self.channel_metric in NEEDS_ACTIVATIONS
            or self.allocation == "cfsp"
            or self.compensation != "none"
            or bool(self.drop_attention)
            or bool(self.kv_groups)
        )

    @property
    def adds_bias(self) -> bool:
        """Whether the compensation writes a bias: the mean rule, and the refit's intercept (a uniform,
        stock output refits without one)."""
        return self.compensation == "mean" or (
            self.compensation in ("refit", "reconstruct") and not self.uniform
        )

    @property
    def reconstructs(self) -> bool:
        return self.compensation == "reconstruct"

    @property
    def needs_window_stats(self) -> bool:
        """Only the reference's FLAP fluctuation reads per-window sums; nothing else keeps them."""
        return self.channel_metric == "flap" and self.fluctuation == "windows"


def option_help(name: str) -> str:
    """The help text of one option, for the command line."""
    return next(f.metadata["help"] for f in fields(PruneConfig) if f.name == name)
