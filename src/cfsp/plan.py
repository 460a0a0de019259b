"""``pruning_plan.json``: what a pruning decided, read and checked in one place."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cfsp.errors import CfspError
from cfsp.outdir import PLAN_FILE


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
