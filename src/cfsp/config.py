"""``PruneConfig``: every pruning option, its default, its help text and its check, in one place.

``prune`` takes one; the plan records it and ``PruneConfig.from_dict`` reads it back; the command
line generates its flags from these fields (``cfsp.cli.options``), so a new option is one field.
Options left as None are filled when the config is made: first from the method's table entry
(``cfsp.methods``), then from the preset. The ``reference`` preset is the reference
implementation's numerics, as values of the options below, not a flag that every step checks.

This module sits at the bottom of the package: it imports neither torch nor any pipeline step
(``cfsp --help`` reads it), so the names each step registers are listed here as constants and the
step's table is checked against them when that step is imported.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from cfsp.errors import CfspError
from cfsp.methods import ALLOCATIONS, METHODS, get_method

# Names registered by the steps' tables (each table is checked against its tuple on import).
BLOCK_METRICS = ("angular", "cosine", "mse", "mae", "uniform")  # cfsp.scoring.BLOCK_METRICS
CHANNEL_METRICS = (  # cfsp.scoring.CHANNEL_METRICS
    "cfsp_paper",
    "cfsp_paper_unweighted",
    "cfsp_paper_down",
    "activation",
    "ria",
    "wanda_base",
    "mag_base",
    "flap",
)
WEIGHT_ONLY_METRICS = ("mag_base",)  # channel metrics that read no activations
KV_GROUP_METRICS = ("refit", "energy")  # cfsp.scoring.KV_GROUP_METRICS
EXPERT_METRICS = ("reap", "frequency", "gate_mass", "random")  # cfsp.scoring.EXPERT_METRICS
COMPENSATIONS = ("none", "mean", "refit", "reconstruct")  # cfsp.compensation; reconstruct: after the refit
ROUNDINGS = ("budget", "nearest", "reference")  # cfsp.allocation; reference: half-up
PRESETS = ("default", "reference")
SELECTIONS = ("topk", "threshold")
IMPORTANCE_SCALES = ("mean", "sum")
FLUCTUATIONS = ("variance", "windows")
RECONSTRUCT_TARGETS = ("mlp", "block")
RECONSTRUCT_INPUTS = ("dense", "pruned")
SCHEDULES = ("cosine", "constant")
SECOND_MOMENTS = ("auto", "hold", "second-pass")

# Reference allocation: logits are (I_sum - mean) / 1e4 with I_sum summed over N*L tokens, i.e.
# temperature N*L/1e4 on per-token means; 13.1072 is the reference default N=128, L=1024.
DEFAULT_TEMPERATURE = 128 * 1024 / 1e4
DEFAULT_DAMPING = 1e-4  # benchmarks/refit.py: 1e-5 and 1e-4 best, 1e-1 worse than no refit
# second_moments="auto" holds the Gram matrices if they take at most this share of the weights
# (benchmarks/prune_cost.py: SmolLM2's take 0.26 of its weights; held, the prune peaked lower than
# with the second pass and took 1.21 forward passes instead of 1.75).
HOLD_SHARE_OF_WEIGHTS = 1 / 3

# What the reference implementation does where cfsp's defaults differ (docs/method.md); applied
# to every option the caller left unset.
REFERENCE_PRESET = dict(
    rounding="reference", selection="threshold", importance_scale="sum", fluctuation="windows"
)
DEFAULT_PRESET = dict(rounding="budget", selection="topk", importance_scale="mean", fluctuation="variance")

# Spellings of earlier versions: option names (plans, keywords) and channel metric names.
RENAMED_OPTIONS = {"b": "weight_activation_exponent", "c": "activation_exponent"}
RENAMED_METRICS = {
    "three_w_one_wa": "cfsp_paper",
    "three_w_one_a": "cfsp_paper_unweighted",
    "one_wa": "cfsp_paper_down",
    "one_a": "activation",
}


def option(default: Any = MISSING, help: str = "", *, choices: tuple = (), flag: str | None = None, **kw):
    """A config field with the metadata the command line is generated from: its help, its choices
    (listed in the help and checked by the config) and, where it differs, its flag's name."""
    metadata = {"help": help, "choices": choices, "flag": flag, **kw}
    if isinstance(default, type) and is_dataclass(default):  # a nested config
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_number(owner: str, name: str, value, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CfspError(f"{owner}{name} must be a finite number, got {value}")
    if low is not None and value < low:
        raise CfspError(f"{owner}{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise CfspError(f"{owner}{name} must be <= {high}, got {value}")


def _check_whole(owner: str, name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CfspError(f"{owner}{name} must be a whole number >= {low}, got {value}")


def check_choices(config) -> None:
    """Every field of a config dataclass with ``choices`` holds one of them."""
    for f in fields(config):
        allowed = f.metadata.get("choices")
        value = getattr(config, f.name)
        if allowed and value is not None and value not in allowed:
            what = f.name.replace("_", " ")
            raise CfspError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


@dataclass
class ReconstructConfig:
    """``--compensation reconstruct``: how each pruned MLP is trained towards the dense outputs
    (``cfsp.reconstruction``). The command line's flags are these names after ``reconstruct-``."""

    epochs: int = option(2, "reconstruct: passes over the calibration tokens per block.")
    lr: float = option(1e-3, "reconstruct: Adam learning rate.")
    batch_tokens: int = option(256, "reconstruct: tokens per training step.")
    target: str = option(
        "block",
        "reconstruct: aim at the dense block's output (block) or the dense MLP's output (mlp).",
        choices=RECONSTRUCT_TARGETS,
    )
    inputs: str = option(
        "pruned",
        "reconstruct: train on the pruned model's MLP inputs (pruned) or the dense model's (dense).",
        choices=RECONSTRUCT_INPUTS,
    )
    holdout: float = option(
        0.125, "reconstruct: share of calibration windows held out to pick the epoch and stop early."
    )
    schedule: str = option(
        "cosine", "reconstruct: learning-rate schedule, cosine or constant.", choices=SCHEDULES
    )

    FLAG_PREFIX = "reconstruct_"  # flat spelling: reconstruct_epochs=..., --reconstruct-epochs

    def __post_init__(self) -> None:
        check_choices(self)
        _check_whole("reconstruct_", "epochs", self.epochs)
        _check_whole("reconstruct_", "batch_tokens", self.batch_tokens)
        _check_number("reconstruct_", "lr", self.lr)
        if self.lr <= 0:
            raise CfspError(f"reconstruct_lr must be > 0, got {self.lr}")
        _check_number("reconstruct_", "holdout", self.holdout)
        if not 0.0 <= self.holdout <= 0.5:
            raise CfspError(
                f"reconstruct_holdout must be in [0, 0.5] (a share of the calibration windows), got "
                f"{self.holdout}"
            )


@dataclass
class AttentionCutConfig:
    """What is cut from the attention sublayers: whole sublayers and KV groups (``cfsp.attention``)."""

    drop_attention: float | str = option(
        0,
        "Attention sublayers to remove: a count (2) or a share of the blocks (0.1), those that turn the "
        "residual stream least on the calibration tokens; their blocks keep the MLP. auto: with "
        "--total-sparsity, try 0, 1, 2, 4, ... and keep the count with the lowest held-out loss.",
        count_or_word=True,
    )
    kv_groups: int = option(
        0,
        "KV groups (a KV head and the query heads that read it) to remove from every attention sublayer "
        "that stays, the lowest-scoring by kv_group_metric on the calibration tokens; o_proj is refit on "
        "the kept heads unless --compensation is none or mean. The KV cache loses as many KV heads.",
    )
    kv_group_metric: str = option(
        "refit",
        "KV-group score: refit (the error the o_proj refit leaves without the group) or energy (the "
        "group's share of o_proj's output).",
        choices=KV_GROUP_METRICS,
    )

    FLAG_PREFIX = ""  # flat spelling: drop_attention=..., --drop-attention

    def __post_init__(self) -> None:
        check_choices(self)
        value = self.drop_attention
        if value != "auto" and (
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
        if isinstance(self.kv_groups, bool) or not isinstance(self.kv_groups, int) or self.kv_groups < 0:
            raise CfspError(
                f"kv_groups must be a whole count >= 0 (1 removes one KV group per sublayer), got {self.kv_groups}"
            )

    @property
    def cuts(self) -> list[str]:
        """The flags of the cuts asked for."""
        return [
            flag
            for flag, on in (("--drop-attention", self.drop_attention), ("--kv-groups", self.kv_groups))
            if on
        ]


NESTED = {"reconstruct": ReconstructConfig, "attention": AttentionCutConfig}


@dataclass
class PruneConfig:
    """How to prune: validated and completed on creation, so a bad value fails before any work."""

    sparsity: float | None = option(
        None,
        "Fraction of FFN channels to remove, in (0, 1) (default 0.5; 0 with an expert cut alone).",
    )
    expert_sparsity: float = option(
        0.0,
        "Fraction of the routed experts of every mixture-of-experts block to remove (0.5 removes half); "
        "the router loses their rows and the output stays the family's stock checkpoint.",
    )
    expert_channel_sparsity: float = option(
        0.0,
        "Fraction of the intermediate channels of every routed expert to remove, the same count in each "
        "(one expert width, as engines stack experts), chosen per expert over the tokens routed to it.",
    )
    expert_metric: str = option(
        "reap",
        "Which routed experts stay: reap (routing weight x output norm over the tokens routed to the "
        "expert), frequency (how often routed), gate_mass (summed routing weight), random (a control).",
        choices=EXPERT_METRICS,
    )
    method: str = option("cfsp", "The pruning method (cfsp.methods).", choices=tuple(METHODS))
    preset: str = option(
        "default", "default, or reference: the reference implementation's numerics.", choices=PRESETS
    )
    block_metric: str = option("angular", "Block importance.", choices=BLOCK_METRICS)
    channel_metric: str | None = option(
        None, "Channel score (default: the method's).", choices=CHANNEL_METRICS
    )
    allocation: str | None = option(None, "Widths per block (default: the method's).", choices=ALLOCATIONS)
    temperature: float = option(DEFAULT_TEMPERATURE, "CFSP allocation temperature.")
    weight_activation_exponent: float = option(
        1.0, "Activation exponent inside the weight term of the CFSP score (the paper's b).", alias="b"
    )
    activation_exponent: float = option(
        1.0, "Activation exponent of the channel score (the paper's c).", alias="c"
    )
    multiple: int | None = option(None, "Round widths to this multiple (1 = off; default: the method's).")
    rounding: str | None = option(
        None,
        "budget: hit the target sparsity overall; nearest: round each block alone; reference: half-up.",
        choices=ROUNDINGS,
    )
    selection: str | None = option(
        None, "topk: exactly the width; threshold: the reference's score cut.", choices=SELECTIONS
    )
    importance_scale: str | None = option(
        None,
        "mean: per-token importance (temperature as given); sum: the reference's summed importance.",
        choices=IMPORTANCE_SCALES,
    )
    fluctuation: str | None = option(
        None, "FLAP's statistic: variance, or the reference's per-window recurrence.", choices=FLUCTUATIONS
    )
    compensation: str | None = option(
        None,
        "none, mean (pruned channels' mean output in the bias), refit (least squares) or reconstruct "
        "(the refit, then each pruned MLP trained to the dense outputs).",
        choices=COMPENSATIONS,
    )
    refit_damping: float = option(
        DEFAULT_DAMPING, "Ridge damping of the refit, relative to the mean variance."
    )
    second_moments: str = option(
        "auto",
        "The refit's Gram matrices: hold every block's from the one calibration pass (hold), or collect "
        "each just before its block is refit in a second pass (second-pass: one block's at a time); auto "
        "holds them when they take at most --max-memory.",
        choices=SECOND_MOMENTS,
    )
    max_memory: float | None = option(
        None,
        "GiB the held Gram matrices may take (auto): without it, a third of the model's weights, and "
        "never when streaming.",
    )
    reconstruct: ReconstructConfig = option(ReconstructConfig, "Options of --compensation reconstruct.")
    attention: AttentionCutConfig = option(AttentionCutConfig, "Attention sublayer and KV-group cuts.")
    uniform: bool = option(
        False,
        "Every block keeps the same width (one multiple): a stock checkpoint that every engine serves, "
        "without per-block widths, remote code or MLP biases.",
    )
    total_sparsity: float | None = option(
        None,
        "Budget mode: the share of all parameters to remove; the FFN sparsity is derived from it after "
        "the attention cuts (dropped sublayers, KV groups) are counted (replaces --sparsity); on a "
        "mixture-of-experts model, whole routed experts.",
    )
    sequential: bool = option(False, "Score each block on the already-pruned blocks' outputs.")
    allow_inexact: bool = option(False, "Warn instead of failing when the widths miss the sparsity.")
    batch_size: int = option(8, "Windows per forward batch during calibration.")
    offload_activations: bool = option(False, "Keep calibration activations on the CPU between blocks.")

    def __post_init__(self) -> None:
        if self.sparsity is None:  # FFN channels stay when only experts are asked for
            self.sparsity = 0.0 if self.cuts_experts else 0.5
        for name, kind in NESTED.items():  # a nested config may come as its dict (a plan, to_dict)
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**value))
            elif not isinstance(value, kind):
                raise CfspError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        if self.preset not in PRESETS:
            raise CfspError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.channel_metric in RENAMED_METRICS:
            self.channel_metric = RENAMED_METRICS[self.channel_metric]
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
        for name in ("sparsity", "temperature", "weight_activation_exponent", "activation_exponent"):
            alias = next((old for old, new in RENAMED_OPTIONS.items() if new == name), None)
            _check_number("", name + (f" ({alias})" if alias else ""), getattr(self, name))
        _check_number("", "refit_damping", self.refit_damping, low=0)
        _check_number("", "temperature", self.temperature, low=0)
        for name in ("expert_sparsity", "expert_channel_sparsity"):
            _check_number("", name, getattr(self, name))
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise CfspError(
                    f"{name} must be in [0, 1), got {getattr(self, name)}; e.g. 0.5 removes half of them"
                )
        low = 0.0 if self.cuts_experts else None  # channels may stay when experts go
        if not ((low is not None and float(self.sparsity) == low) or 0.0 < float(self.sparsity) < 1.0):
            raise CfspError(
                f"sparsity must be in (0, 1), got {self.sparsity}; e.g. 0.5 removes half the FFN channels"
            )
        check_choices(self)
        self.multiple = int(self.multiple)
        if self.multiple < 1:
            raise CfspError(f"multiple must be >= 1 (1 = no rounding), got {self.multiple}")
        _check_whole("", "batch_size", self.batch_size)
        if self.max_memory is not None:
            _check_number("", "max_memory", self.max_memory, low=0)
        if self.uniform and (
            self.compensation == "mean" or self.selection != "topk" or self.rounding == "budget"
        ):
            raise CfspError(
                "--uniform writes a stock checkpoint, whose MLP has no bias and whose blocks share one exact "
                "width: use --compensation refit (solved without a bias), reconstruct or none, and the default channel "
                "selection and rounding"
            )
        cuts = self.attention
        if cuts.drop_attention == "auto" and self.total_sparsity is None:
            raise CfspError(
                "--drop-attention auto chooses how a parameter budget is split between attention and "
                "FFN: give the budget with --total-sparsity"
            )
        if cuts.drop_attention and self.uniform:
            raise CfspError(
                "--uniform writes a stock checkpoint, in which every block has its attention; drop "
                "--drop-attention or --uniform"
            )
        if cuts.cuts and self.compensation == "reconstruct":
            raise CfspError(
                "--compensation reconstruct trains each MLP on the dense attention's outputs and cannot be "
                f"combined with {' or '.join(cuts.cuts)}; use --compensation refit"
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

    @classmethod
    def from_options(cls, start: float | PruneConfig | None = None, **options) -> PruneConfig:
        """A config from ``prune``'s keywords (``reference=True`` is the reference preset; nested
        options by their flat names, ``reconstruct_epochs=1``, ``kv_groups=1``); ``start`` is the
        sparsity, or an existing config whose options the keywords replace."""
        if "bias_compensation" in options:
            raise CfspError(
                "bias_compensation is gone; use compensation='mean' (True) or compensation='none' (False)"
            )
        if "reference" in options:
            options["preset"] = "reference" if options.pop("reference") else options.get("preset", "default")
        options = {RENAMED_OPTIONS.get(k, k): v for k, v in options.items()}
        nested = {name: {} for name in NESTED}
        for name, kind in NESTED.items():
            for f in fields(kind):
                flat = kind.FLAG_PREFIX + f.name
                if flat in options:
                    nested[name][f.name] = options.pop(flat)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise CfspError(
                f"unknown pruning option(s) {', '.join(unknown)}; the options are {', '.join(flat_option_names())}"
            )
        current = start if isinstance(start, PruneConfig) else None
        if start is not None and current is None:
            options["sparsity"] = start
        for name, values in nested.items():
            if values:
                nested_start = getattr(current, name) if current is not None else options.get(name)
                if isinstance(nested_start, dict):
                    nested_start = NESTED[name](**nested_start)
                options[name] = replace(nested_start or NESTED[name](), **values)
        if current is not None:
            return replace(current, **options) if options else current
        return cls(**options)

    @classmethod
    def from_dict(cls, values: dict) -> PruneConfig:
        """The config a plan recorded (``to_dict``), also from earlier versions' flat spellings;
        an option this version does not know is one line naming it."""
        if not isinstance(values, dict):
            raise CfspError(f"pruning options must be a JSON object, got {type(values).__name__}")
        try:
            return cls.from_options(**values)
        except CfspError as exc:
            if str(exc).startswith("unknown pruning option"):
                raise CfspError(
                    f"{exc}. The plan was written by another cfsp version; prune again with this one"
                ) from None
            raise

    def to_dict(self) -> dict:
        return asdict(self)

    def with_changes(self, **options) -> PruneConfig:
        """This config with some options replaced (flat names as ``from_options``)."""
        return PruneConfig.from_options(self, **options)

    @property
    def needs_calibration(self) -> bool:
        """Activation-based scores, importance-based allocation, every compensation and the
        attention cuts read the calibration pass; Magnitude-SP without compensation needs none."""
        return (
            self.channel_metric not in WEIGHT_ONLY_METRICS
            or self.allocation == "cfsp"
            or self.compensation != "none"
            or bool(self.attention.cuts)
        )

    @property
    def cuts_experts(self) -> bool:
        """Whether routed experts (or channels inside them) of a mixture-of-experts model go."""
        return bool(self.expert_sparsity or self.expert_channel_sparsity)

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


def flat_fields(config_class: type = PruneConfig) -> list[tuple[str, Any, str | None]]:
    """Every option as (flat name, field, nested config name or None): nested configs' fields under
    their flat spelling, as keywords and flags use them."""
    out = []
    for f in fields(config_class):
        kind = f.default_factory if is_dataclass(f.default_factory) else None  # a nested config
        if kind is not None:
            out += [(kind.FLAG_PREFIX + g.name, g, f.name) for g in fields(kind)]
        else:
            out.append((f.name, f, None))
    return out


def flat_option_names() -> list[str]:
    return [name for name, _, _ in flat_fields()]


def option_help(name: str) -> str:
    """The help text of one option (flat name), for the command line and the docs."""
    name = RENAMED_OPTIONS.get(name, name)
    for flat, f, _ in flat_fields():
        if flat == name:
            return f.metadata["help"]
    raise KeyError(name)


def field_default(f) -> Any:
    """A field's default value (calling its factory)."""
    return f.default if f.default is not MISSING else f.default_factory()
