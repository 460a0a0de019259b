"""Pruning methods as table entries: a channel metric, an allocation rule and defaults.

Adding a method is one entry here (plus, if new, one scoring function in ``scoring.py``); the
calibration pass, surgery, saving and reporting are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cfsp.errors import CfspError

ALLOCATIONS = ("cfsp", "uniform", "global")


@dataclass(frozen=True)
class Method:
    """How one method decides which FFN channels to keep."""

    channel_metric: str
    allocation: str  # "cfsp" (importance-based sigmoid), "uniform" or "global" (one threshold)
    multiple: int  # default rounding of widths (1 = none)
    compensation: str = "none"  # what replaces the pruned channels' output: none, mean or refit
    summary: str = ""
    reference_defaults: dict = field(default_factory=dict)  # what the reference uses where we differ


METHODS: dict[str, Method] = {
    # Defaults chosen by benchmarks/search_defaults.py and benchmarks/refit.py (see the README's
    # results): the relative-importance channel score beat the reference's activation-only score,
    # and the least-squares refit of down_proj beat mean compensation on both models.
    "cfsp": Method(
        "ria",
        "cfsp",
        128,
        compensation="refit",
        summary="block angular importance -> sigmoid widths; relative weight x activation channel score",
        reference_defaults=dict(channel_metric="cfsp_paper", compensation="none"),
    ),
    "wanda-sp": Method("wanda_base", "global", 1, summary="|W_down| x activation norm, one global threshold"),
    "flap": Method(
        "flap",
        "global",
        1,
        compensation="mean",
        summary="fluctuation x squared column norm, global threshold, bias compensation",
    ),
    "magnitude-sp": Method("mag_base", "uniform", 1, summary="down_proj column norm, same width everywhere"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CfspError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
