"""Shared pieces of the benchmark scripts: one dense model, one calibration pass, many variants."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cfsp
from cfsp.evaluation import perplexity, wikitext_ids
from cfsp.llamacpp import GreedyRunner, open_model
from cfsp.memory import pruning_cost
from cfsp.outdir import dumps, write_text_atomic
from cfsp.speed import forward_pass_seconds
from cfsp.statistics import calibrate

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
    stats, cost = pruning_cost(calibrate, model, calib, 8, second_moments=second_moments, progress=False)
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


def test_windows(tokenizer, windows: int, seqlen: int) -> torch.Tensor:
    ids = wikitext_ids(tokenizer)
    return ids[: windows * seqlen].reshape(windows, seqlen)


def speeds(
    files: dict[str, Path], prompt_length: int, decode_tokens: int, rounds: int, flash_attn: bool = False
) -> dict[str, dict]:
    """Median prefill and decode tokens/s of each file; each round times every file once, in turn,
    so that slow drifts of the machine spread over all of them."""
    prompt = torch.randint(4, 1000, (1, prompt_length), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in files}
    threads = torch.get_num_threads()
    for round_ in range(rounds + 1):  # round 0 warms up (page cache, llama.cpp's first-call work)
        for name, path in files.items():
            context = prompt_length + decode_tokens + 1
            with open_model(path, context, threads=threads, flash_attn=flash_attn) as model:
                runner = GreedyRunner(model)
                prefill, decode = runner(prompt, decode_tokens)
            if round_:
                times[name].append((prefill, decode))
    return {
        name: dict(
            prefill_tokens_per_s=prompt_length / statistics.median(p for p, _ in runs),
            decode_tokens_per_s=decode_tokens / statistics.median(d for _, d in runs),
            threads=threads,
            flash_attn=flash_attn,
        )
        for name, runs in times.items()
    }
