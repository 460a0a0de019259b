"""Shared pieces of the benchmark scripts: one dense model, one calibration pass, many variants."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cfsp
from cfsp.bench import forward_pass_seconds
from cfsp.calibration import calibrate
from cfsp.evaluation import perplexity
from cfsp.memory import pruning_cost
from cfsp.outdir import dumps, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class DenseSetup:
    """A dense model with its calibration windows and their statistics, computed once."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    calib: torch.Tensor
    stats: list
    calib_seconds: float
    calib_peak_mb: float
    forward_seconds: float


def add_protocol_arguments(parser) -> None:
    """Calibration and evaluation sizes, shared so that every script measures on the same subsets."""
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 test windows")
    parser.add_argument("--ppl-seqlen", type=int, default=512, help="WikiText-2 window length")
    parser.add_argument("--limit", type=int, default=20, help="examples per zero-shot task (first N)")


def prepare(
    name: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    time_forward: bool = True,
    second_moments: bool = True,
) -> DenseSetup:
    """Load ``name``, draw WikiText-2 validation windows, run the one calibration pass and time it.

    ``time_forward`` also times one plain forward pass of the same windows, the yardstick of the
    pruning cost; searches that only compare perplexities skip it. ``second_moments`` records the
    Gram matrices the refit compensation (cfsp's default) needs.
    """
    model, tokenizer = cfsp.load_model(name)
    calib = cfsp.calibration_windows(tokenizer, n=nsamples, length=seqlen, seed=seed)
    forward = forward_pass_seconds(model, calib, batch_size=8) if time_forward else float("nan")
    stats, cost = pruning_cost(calibrate, model, calib, 8, None, False, second_moments)
    return DenseSetup(
        name=name,
        model=model,
        tokenizer=tokenizer,
        calib=calib,
        stats=stats,
        calib_seconds=cost["seconds"],
        calib_peak_mb=cost["peak_rss_bytes"] / 2**20,
        forward_seconds=forward,
    )


def pruned_variant(setup: DenseSetup, sparsity: float, **options) -> tuple[torch.nn.Module, cfsp.PruneResult]:
    """A pruned copy of the dense model, reusing the shared calibration statistics."""
    model = copy.deepcopy(setup.model)
    result = cfsp.prune(model, setup.calib, sparsity, stats=setup.stats, progress=False, **options)
    return model, result


def wikitext_ppl(model, tokenizer, windows: int, seqlen: int) -> float:
    return perplexity(model, tokenizer, seqlen=seqlen, limit=windows, batch_size=4)["ppl"]


def write_json(path: Path, payload) -> None:
    write_text_atomic(path, dumps(payload))


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
