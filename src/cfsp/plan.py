"""``Plan``: what a pruning decided (and measured on the way), typed, and its file
``pruning_plan.json``, read and checked in one place.

*decide* (``cfsp.decide``) makes a plan from the calibration pass: widths, kept channels, dropped
attention sublayers, kept KV groups, and the ``PruneConfig`` it was made with. *apply*
(``cfsp.apply``) carries it out and adds what only the surgery knows (the compensation biases,
the reconstruction reports, the parameter counts). Saving writes it beside the weights;
``Plan.load`` reads it back typed, ``PruneConfig.from_dict`` its options.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfsp.config import PruneConfig
from cfsp.errors import CfspError
from cfsp.outdir import PLAN_FILE

if TYPE_CHECKING:
    import torch

# Keys of a plan file that are lists of index tensors in a ``Plan``.
_INDEX_LISTS = ("kept_channels", "kept_kv_groups", "down_biases", "kept_experts", "kept_expert_channels")


@dataclass
class Plan:
    """Everything later steps need: saving, reporting, recovery and benchmarks never recompute it."""

    config: PruneConfig
    original_widths: list[int]
    widths: list[int]
    kept_channels: list[torch.Tensor]
    keep_fractions: list[float]
    block_importance: list[float] | None = None  # the coarse statistic per block (None: not calibrated)
    attention_importance: list[float] | None = None  # angular distance across each attention sublayer
    mlp_importance: list[float] | None = None  # ... and across each MLP sublayer
    dropped_attention: list[int] = field(default_factory=list)  # blocks whose attention is removed
    kept_kv_groups: list[torch.Tensor | None] | None = None  # per block, its KV groups kept (kv_groups)
    attention_search: list[dict] | None = None  # drop_attention="auto": each count tried, its loss
    calibration: dict | None = None  # what the calibration windows were
    compensation_rule: str | None = (
        None  # what the surgery applies: none, mean or refit (also under reconstruct)
    )
    # Mixture-of-experts blocks (None for a dense model; per block, None for a dense block):
    original_experts: list[int | None] | None = None  # routed experts before
    kept_experts: list[torch.Tensor | None] | None = None  # the routed experts kept, ascending
    expert_scores: list[list[float] | None] | None = None  # each expert's score (expert_metric)
    unrouted_experts: list[int | None] | None = None  # experts the calibration never routed to
    # [E', I'] per MoE block: each kept expert's kept intermediate channels (expert_channel_sparsity);
    # the block's entry in widths is then I' (and kept_channels, one list per block, is 0..I'-1)
    kept_expert_channels: list[torch.Tensor | None] | None = None
    # Filled by apply:
    down_biases: list[torch.Tensor] | None = None  # bias compensation added to down_proj, per block
    reconstruction: list[dict] | None = None  # per reconstructed block: its error before and after
    second_moments: str | None = None  # the refit's Gram matrices: "held" (one pass) or "second pass"
    params_before: int = 0
    params_after: int = 0
    active_params_before: int = 0  # what one token runs through (all but the routed experts it skips)
    active_params_after: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # what saving and recovery add (versions, source, ...)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def options(self) -> dict:
        return self.config.to_dict()

    @property
    def target_sparsity(self) -> float:
        return float(self.config.sparsity)

    @property
    def stock_output(self) -> bool:
        """Whether the pruned model is the family's stock class (one width, or experts alone removed)."""
        if self.config.uniform:
            return True
        if self.kept_experts is None:
            return False
        dense = [n is None for n in self.original_experts]
        same = all(w == o for w, o, d in zip(self.widths, self.original_widths, dense, strict=True) if d)
        return same and not self.dropped_attention and self.kept_kv_groups is None

    @property
    def experts_before(self) -> int:
        return sum(n for n in self.original_experts or [] if n is not None)

    @property
    def experts_after(self) -> int:
        return sum(k.numel() for k in self.kept_experts or [] if k is not None)

    @property
    def realised_sparsity(self) -> float:
        return 1.0 - sum(self.widths) / sum(self.original_widths)

    def to_dict(self) -> dict:
        """The JSON-ready plan (tensors as lists of numbers)."""
        plan: dict[str, Any] = dict(
            method=self.method,
            options=self.options,
            target_sparsity=self.target_sparsity,
            realised_sparsity=self.realised_sparsity,
        )
        for f in fields(self):
            if f.name in ("config", "extra"):
                continue
            value = getattr(self, f.name)
            if f.name in _INDEX_LISTS and value is not None:
                value = [None if v is None else v.tolist() for v in value]
            plan[f.name] = value
        plan.update(self.extra)
        return plan

    to_plan = to_dict  # the name earlier versions used

    @classmethod
    def from_dict(cls, plan: dict, where: str | os.PathLike = PLAN_FILE) -> Plan:
        """A plan read from its JSON form, checked first (one line naming the first problem)."""
        import torch

        check_plan(plan, where)
        values = dict(plan)
        config = PruneConfig.from_dict(values.pop("options", {}) or {})
        for key in ("method", "target_sparsity", "realised_sparsity"):
            values.pop(key, None)
        known = {f.name for f in fields(cls)}
        typed = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known}
        typed["kept_channels"] = [torch.tensor(k, dtype=torch.long) for k in typed["kept_channels"]]
        if typed.get("kept_kv_groups") is not None:
            typed["kept_kv_groups"] = [
                None if g is None else torch.tensor(g, dtype=torch.long) for g in typed["kept_kv_groups"]
            ]
        for key in ("kept_experts", "kept_expert_channels"):
            if typed.get(key) is not None:
                typed[key] = [None if k is None else torch.tensor(k, dtype=torch.long) for k in typed[key]]
        if typed.get("down_biases") is not None:
            typed["down_biases"] = [torch.tensor(b, dtype=torch.float64) for b in typed["down_biases"]]
        typed.setdefault("original_widths", list(typed["widths"]))
        typed.setdefault(
            "keep_fractions", [w / d for w, d in zip(typed["widths"], typed["original_widths"], strict=True)]
        )
        return cls(config=config, extra=extra, **typed)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """The typed plan of a pruned directory."""
        return cls.from_dict(read_plan(path), Path(path).expanduser() / PLAN_FILE)


def read_plan(path: str | os.PathLike) -> dict:
    """The ``pruning_plan.json`` of a pruned directory, checked for the fields loading needs."""
    plan_path = Path(path).expanduser() / PLAN_FILE
    if not plan_path.is_file():
        raise CfspError(f"{path} is not a cfsp pruned directory (no {PLAN_FILE})")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CfspError(f"{plan_path} is not valid JSON ({exc}); restore it from the original run") from None
    check_plan(plan, plan_path)
    return plan


def check_plan(plan, where: str | os.PathLike = PLAN_FILE) -> None:
    """One line naming the first problem of an invalid or incomplete plan."""

    def bad(problem: str) -> CfspError:
        return CfspError(f"{where}: {problem}; restore the file from the run that wrote it")

    if not isinstance(plan, dict):
        raise bad("expected a JSON object")
    for key, kind in (("architecture", str), ("method", str), ("widths", list), ("kept_channels", list)):
        if not isinstance(plan.get(key), kind):
            raise bad(f"missing or invalid {key!r}")
    widths, kept = plan["widths"], plan["kept_channels"]
    original = plan.get("original_widths", widths)
    if not isinstance(original, list) or not len(widths) == len(kept) == len(original):
        raise bad("widths, original_widths and kept_channels must have one entry per block")
    for block, (width, full, channels) in enumerate(zip(widths, original, kept, strict=True)):
        if not (_is_int(width) and _is_int(full) and 0 < width <= full):
            raise bad(f"block {block}: width {width!r} is not an integer in [1, {full!r}]")
        if not isinstance(channels, list) or len(channels) != width or not all(map(_is_int, channels)):
            raise bad(f"block {block}: kept_channels must be {width} channel indices")
        if channels != sorted(set(channels)) or channels[0] < 0 or channels[-1] >= full:
            raise bad(f"block {block}: kept_channels must be distinct, ascending and below {full}")
    dropped = plan.get("dropped_attention", [])
    if not isinstance(dropped, list) or not all(_is_int(i) and 0 <= i < len(widths) for i in dropped):
        raise bad(f"dropped_attention must be block indices below {len(widths)}")
    groups = plan.get("kept_kv_groups")
    if groups is not None:
        if not isinstance(groups, list) or len(groups) != len(widths):
            raise bad("kept_kv_groups must have one entry per block")
        sizes = {len(g) for g in groups if isinstance(g, list)}
        for block, kept in enumerate(groups):
            if kept is None:
                continue
            if not isinstance(kept, list) or not kept or not all(map(_is_int, kept)):
                raise bad(f"block {block}: kept_kv_groups must be null or KV group indices")
            if kept != sorted(set(kept)) or kept[0] < 0 or len(sizes) != 1:
                raise bad(
                    f"block {block}: kept_kv_groups must be distinct, ascending and as many in every block"
                )
    experts, counts = plan.get("kept_experts"), plan.get("original_experts")
    if experts is not None:
        if (
            not isinstance(experts, list)
            or not isinstance(counts, list)
            or not len(experts) == len(counts) == len(widths)
        ):
            raise bad("kept_experts and original_experts must have one entry per block")
        for block, (kept, count) in enumerate(zip(experts, counts, strict=True)):
            if kept is None and count is None:
                continue
            if not (_is_int(count) and isinstance(kept, list) and kept and all(map(_is_int, kept))):
                raise bad(f"block {block}: kept_experts must be expert indices and original_experts a count")
            if kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= count:
                raise bad(f"block {block}: kept_experts must be distinct, ascending and below {count}")
    biases = plan.get("down_biases")
    if biases is not None:
        if not isinstance(biases, list) or len(biases) != len(widths):
            raise bad("down_biases must have one entry per block")
        for block, bias in enumerate(biases):
            if not isinstance(bias, list) or not all(_is_finite_number(v) for v in bias):
                raise bad(f"block {block}: down_biases must be finite numbers")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
