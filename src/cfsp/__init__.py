"""cfsp: coarse-to-fine structured pruning of LLM feed-forward layers, and its recovery."""

from cfsp.data import calibration_windows
from cfsp.errors import CfspError
from cfsp.io import apply_plan, load_pruned, read_plan, save_pruned
from cfsp.models import load_model
from cfsp.pruning import PruneResult, prune

__all__ = [
    "CfspError",
    "PruneResult",
    "apply_plan",
    "calibration_windows",
    "load_model",
    "load_pruned",
    "prune",
    "read_plan",
    "save_pruned",
]
