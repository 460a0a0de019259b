"""cfsp: coarse-to-fine structured pruning of LLM feed-forward layers, and its recovery.

The names below are imported on first use, so that ``import cfsp`` (and ``cfsp --help``) does not
load torch and the whole pipeline before anything needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfsp.lazy import lazy_exports

_EXPORTS = {
    "CfspError": "cfsp.errors",
    "Plan": "cfsp.plan",
    "PruneConfig": "cfsp.config",
    "PruneResult": "cfsp.pruning",
    "RecoveryConfig": "cfsp.recovery.config",
    "apply_plan": "cfsp.saving",
    "calibration_windows": "cfsp.data",
    "evaluate": "cfsp.evaluation",
    "export_gguf": "cfsp.export",
    "llamacpp_speed_benchmark": "cfsp.speed",
    "load_model": "cfsp.models",
    "load_pruned": "cfsp.models",
    "prune": "cfsp.pruning",
    "read_plan": "cfsp.plan",
    "recover": "cfsp.recovery",
    "save_pruned": "cfsp.saving",
    "speed_benchmark": "cfsp.speed",
}
__all__ = [
    "CfspError",
    "Plan",
    "PruneConfig",
    "PruneResult",
    "RecoveryConfig",
    "apply_plan",
    "calibration_windows",
    "evaluate",
    "export_gguf",
    "llamacpp_speed_benchmark",
    "load_model",
    "load_pruned",
    "prune",
    "read_plan",
    "recover",
    "save_pruned",
    "speed_benchmark",
]

if TYPE_CHECKING:
    from cfsp.config import PruneConfig
    from cfsp.data import calibration_windows
    from cfsp.errors import CfspError
    from cfsp.evaluation import evaluate
    from cfsp.export import export_gguf
    from cfsp.models import load_model, load_pruned
    from cfsp.plan import Plan, read_plan
    from cfsp.pruning import PruneResult, prune
    from cfsp.recovery import RecoveryConfig, recover
    from cfsp.saving import apply_plan, save_pruned
    from cfsp.speed import llamacpp_speed_benchmark, speed_benchmark


__getattr__ = lazy_exports(__name__, _EXPORTS)
