"""``prune``: *decide* (calibrate -> score -> allocate, ``cfsp.decide``), then *apply* (surgery and
compensation, ``cfsp.apply``); the ``Plan`` it returns is what every later step reads."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from cfsp.apply import apply
from cfsp.calibration import InMemoryBlocks
from cfsp.config import PruneConfig
from cfsp.decide import decide
from cfsp.errors import CfspError
from cfsp.plan import Plan
from cfsp.search import search_drop_count
from cfsp.statistics import BlockStats

log = logging.getLogger("cfsp")
PruneResult = Plan  # the name earlier versions used


def prune(
    model: nn.Module,
    calib: torch.Tensor | None = None,
    config: PruneConfig | float | None = None,
    *,
    progress: bool = True,
    calibration: dict | None = None,
    stats: list[BlockStats] | None = None,
    placement: InMemoryBlocks | None = None,
    **options,
) -> Plan:
    """Prune ``model`` in place as ``config`` says (a ``PruneConfig``) and return its ``Plan``.

    ``config`` may also be the sparsity, with the other options as keywords
    (``prune(model, calib, 0.5, method="flap")``); keywords given beside a config replace its
    values. Every option is checked when the config is made, so a typo fails in a second, not after
    the calibration pass. ``stats`` reuses an earlier ``calibrate`` of the same dense model (with
    ``second_moments=True`` for the refit): every method scores dense activations, so one pass can
    serve several methods and sparsities; they are left as they were. ``placement`` says where
    block weights live (default: in memory; ``cfsp.streaming`` streams them from safetensors).
    ``calibration`` describes the windows for the plan.
    """
    started = time.perf_counter()
    config = PruneConfig.from_options(config, **options)
    search = None
    if config.attention.drop_attention == "auto":
        if placement is not None or calib is None:
            raise CfspError(
                "--drop-attention auto prunes copies of the model in memory with calibration windows; "
                "load the model whole (--no-stream) or give a count"
            )
        count, search = search_drop_count(model, calib, config)
        log.info(f"--drop-attention auto chose {count} attention sublayers")
        config = config.with_changes(drop_attention=count)
    placement = placement or InMemoryBlocks()
    placement.offload_activations = config.offload_activations
    plan, records = decide(
        model, calib, config, placement=placement, stats=stats, progress=progress, calibration=calibration
    )
    plan.attention_search = search
    apply(
        model,
        plan,
        stats=records,
        calib=calib,
        placement=placement,
        keep_statistics=stats is not None,
        progress=progress,
    )
    plan.seconds = time.perf_counter() - started
    return plan
