"""cfsp: coarse-to-fine structured pruning of LLM feed-forward layers, and its recovery."""

from cfsp.bench import llamacpp_speed_benchmark, speed_benchmark
from cfsp.config import PruneConfig
from cfsp.data import calibration_windows
from cfsp.errors import CfspError
from cfsp.evaluation import evaluate
from cfsp.export import export_gguf
from cfsp.io import apply_plan, save_pruned
from cfsp.models import load_model, load_pruned
from cfsp.plan import read_plan
from cfsp.pruning import PruneResult, prune
from cfsp.recovery import RecoveryConfig, recover

__all__ = [
    "CfspError",
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
