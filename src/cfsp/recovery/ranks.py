"""IG-LoRA's rank rule: per-block LoRA ranks that follow block importance at a uniform budget.

IG-LoRA gives each decoder block its own rank, following the block's coarse importance, at the
same number of trainable parameters as uniform LoRA of rank ``R``, so the two are compared at
equal budget.

Rank rule (``allocate_ranks``). For block ``l`` let ``c_l = sum(in + out)`` over its targeted
``nn.Linear`` modules: one rank unit costs ``c_l`` parameters there (a LoRA of rank ``r`` on
``Linear(in, out)`` has ``r * (in + out)``), and ``c_l`` differs between blocks because pruned FFN
widths differ. The uniform budget is ``U = R * sum_l c_l``. With ``w_l = I_l / sum(I)``:

1. ideal ranks ``t_l = max(min_rank, s * w_l)``, with the scale ``s`` solved (bisection) so that
   ``sum_l c_l * t_l = U`` exactly: ranks proportional to importance, floored at ``min_rank``;
2. integer ranks ``r_l = max(min_rank, round(t_l))``;
3. greedy fix-up, one rank unit at a time and only in steps that bring ``sum_l c_l * r_l`` strictly
   closer to ``U``: add 1 to the block furthest below its ideal (when under budget) or take 1 from
   the block furthest above it (when over), never letting a more important block fall below a less
   important one. This runs until the gap is within 2 % of ``U``, then continues only with steps
   that leave the moved block within one unit of its ideal (closer budget, ranks still near ideal);
4. if the gap is still above 2 % of ``U`` (only for very small ``R`` or few blocks), the ideal
   ranks are pulled toward ``R`` (``t <- (1 - a) t + a R``, ``a`` = 0.1, 0.2, ...) and steps 2-3
   repeated; at ``a = 1`` the allocation is uniform and the gap is zero, so this always ends.

Alpha: ``alpha`` defaults to ``2 * rank`` (16 at rank 8, the usual LoRA choice) and each block gets
``alpha_l = alpha * r_l / R``, so the LoRA scaling ``alpha / r`` is the same in every block and a
block's larger rank means more capacity, not a larger update scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from cfsp import models
from cfsp.errors import CfspError
from cfsp.recovery.config import DEFAULT_TARGETS, RecoveryConfig

BUDGET_TOLERANCE = 0.02  # importance and uniform budgets must agree within this fraction


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks and their module path (``model.layers``), which peft patterns need."""
    layers = models.decoder_blocks(model)
    name = next(name for name, module in model.named_modules() if module is layers)
    return name, layers


def block_targets(block: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one block whose last name component is a LoRA target."""
    wanted = set(target_modules)
    return {
        name: module
        for name, module in block.named_modules()
        if name and name.split(".")[-1] in wanted and isinstance(module, nn.Linear)
    }


def rank_unit_costs(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS) -> list[int]:
    """Trainable parameters one LoRA rank unit adds to each block: ``sum(in + out)`` of its targets."""
    _, blocks = decoder_blocks(model)
    costs, found = [], set()
    for index, block in enumerate(blocks):
        linears = block_targets(block, target_modules)
        if not linears:
            raise CfspError(
                f"decoder block {index} has none of the LoRA targets {', '.join(target_modules)}; "
                "check the target module names"
            )
        found.update(name.split(".")[-1] for name in linears)
        costs.append(sum(m.in_features + m.out_features for m in linears.values()))
    missing = sorted(set(target_modules) - found)
    if missing and tuple(target_modules) != DEFAULT_TARGETS:  # the defaults cover every family
        raise CfspError(
            f"LoRA target(s) {', '.join(missing)} match no Linear in any decoder block; fix the names"
        )
    return costs


def lora_param_count(costs: Sequence[int], ranks: Sequence[int]) -> int:
    """Trainable LoRA parameters for per-block ``ranks`` given per-block rank-unit ``costs``."""
    return int(sum(c * r for c, r in zip(costs, ranks, strict=True)))


def _ideal_ranks(weights: Sequence[float], costs: Sequence[int], budget: float, min_rank: int) -> list[float]:
    """Real ranks ``max(min_rank, s * w)`` whose cost is exactly ``budget`` (scale found by bisection)."""

    def cost(scale: float) -> float:
        return sum(c * max(min_rank, scale * w) for c, w in zip(costs, weights, strict=True))

    low = 0.0
    high = budget / min(c * w for c, w in zip(costs, weights, strict=True) if w > 0)
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) < budget else (low, mid)
    return [max(float(min_rank), high * w) for w in weights]


def _round_to_budget(
    ideal: Sequence[float], order: Sequence[float], costs: Sequence[int], budget: int, min_rank: int
) -> list[int]:
    """Integer ranks near ``ideal`` whose cost is within ``BUDGET_TOLERANCE`` of ``budget`` if steps allow.

    Rounded ranks are moved one unit at a time, always toward the budget: first as needed to get
    within tolerance, then only while the moved block stays within one unit of its ideal.
    """
    ranks = [max(min_rank, math.floor(t + 0.5)) for t in ideal]
    count = len(ranks)
    gap = lora_param_count(costs, ranks) - budget

    def best_move(near_ideal: bool) -> int | None:
        step = -1 if gap > 0 else 1
        best, best_key = None, None
        for i in range(count):
            new = ranks[i] + step
            if new < min_rank or abs(gap + step * costs[i]) >= abs(gap):
                continue
            if near_ideal and abs(new - ideal[i]) >= 1:
                continue
            # Keep the order: no block drops below a less important one or rises above a more important one.
            if step < 0 and any(order[j] < order[i] and ranks[j] > new for j in range(count)):
                continue
            if step > 0 and any(order[j] > order[i] and ranks[j] < new for j in range(count)):
                continue
            key = (ranks[i] - ideal[i]) * -step  # how far above (removing) / below (adding) its ideal
            if best_key is None or key > best_key:
                best, best_key = i, key
        return best

    for near_ideal in (False, True):
        while gap != 0 and (near_ideal or abs(gap) > BUDGET_TOLERANCE * budget):
            index = best_move(near_ideal)
            if index is None:
                break
            step = -1 if gap > 0 else 1
            ranks[index] += step
            gap += step * costs[index]
    return ranks


def allocate_ranks(
    block_importance: Sequence[float],
    model: nn.Module,
    rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    min_rank: int = 1,
) -> tuple[list[int], dict[str, Any]]:
    """Per-block LoRA ranks that follow block importance at the uniform rank-``rank`` budget.

    Returns the ranks and a budget record: ``trainable_params`` (these ranks), ``uniform_params``
    (rank ``rank`` everywhere), their ``relative_gap``, the per-block ``cost_per_rank`` and the real
    ``ideal_ranks`` before rounding. See the module docstring for the rule.
    """
    if rank < 1 or min_rank < 1 or min_rank > rank:
        raise CfspError(f"need 1 <= min_rank <= rank, got min_rank={min_rank}, rank={rank}")
    costs = rank_unit_costs(model, target_modules)
    importance = [float(v) for v in block_importance]
    if len(importance) != len(costs):
        raise CfspError(
            f"got {len(importance)} block importances for a model with {len(costs)} decoder blocks; "
            "pass the importances from this model's pruning plan"
        )
    if any(not math.isfinite(v) or v < 0 for v in importance) or sum(importance) <= 0:
        raise CfspError("block importances must be finite, >= 0 and not all zero; re-run the pruning plan")
    total = sum(importance)
    weights = [v / total for v in importance]
    uniform = rank * sum(costs)
    proportional = _ideal_ranks(weights, costs, uniform, min_rank)
    for step in range(11):
        pull = step / 10
        ideal = [(1 - pull) * t + pull * rank for t in proportional]
        ranks = _round_to_budget(ideal, importance, costs, uniform, min_rank)
        used = lora_param_count(costs, ranks)
        if abs(used - uniform) <= BUDGET_TOLERANCE * uniform:
            break
    budget = {
        "allocation": "importance",
        "ranks": ranks,
        "trainable_params": used,
        "uniform_params": uniform,
        "relative_gap": (used - uniform) / uniform,
        "cost_per_rank": costs,
        "ideal_ranks": [round(t, 4) for t in ideal],
        "pull_to_uniform": pull,
    }
    return ranks, budget


def uniform_ranks(
    model: nn.Module, rank: int, target_modules: Sequence[str] = DEFAULT_TARGETS
) -> tuple[list[int], dict[str, Any]]:
    """Plain LoRA: rank ``rank`` in every block, with the same budget record as ``allocate_ranks``."""
    costs = rank_unit_costs(model, target_modules)
    uniform = rank * sum(costs)
    ranks = [rank] * len(costs)
    budget = {
        "allocation": "uniform",
        "ranks": ranks,
        "trainable_params": uniform,
        "uniform_params": uniform,
        "relative_gap": 0.0,
        "cost_per_rank": costs,
    }
    return ranks, budget


def plan_ranks(
    model: nn.Module, block_importance: Sequence[float] | None, config: RecoveryConfig
) -> tuple[list[int], dict[str, Any]]:
    """Ranks for ``config.allocation``: importance-guided (needs importances) or uniform."""
    if config.allocation == "uniform":
        return uniform_ranks(model, config.rank, config.target_modules)
    if block_importance is None:
        raise CfspError(
            "importance allocation needs the block importances; pass them or use uniform allocation"
        )
    return allocate_ranks(block_importance, model, config.rank, config.target_modules, config.min_rank)
