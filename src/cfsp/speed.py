"""Cost of pruning and speed of the pruned model against the dense one.

Speed is measured with the two models interleaved in one run so that machine noise (other jobs,
clock changes, thermal state) falls on both alike; the parameter ratio gives the ceiling a
weight-bound decoder can reach.
"""

from __future__ import annotations

import inspect
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from cfsp.errors import CfspError
from cfsp.models import count_parameters

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
log = logging.getLogger("cfsp")


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the weight files of a saved model: one file, or the weight files in a directory."""
    target = Path(path).expanduser()
    if target.is_file():
        return target.stat().st_size
    if not target.is_dir():
        raise CfspError(f"{target} is neither a weight file nor a model directory")
    files = [f for f in target.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise CfspError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {target}")
    return sum(f.stat().st_size for f in files)


# --------------------------------------------------------------------------- timing helpers


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover the computation itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output) -> Any:
    cache = output.get("cache")
    return cache if cache is not None else output.past_key_values


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module, prompt: torch.Tensor, steps: int
) -> tuple[torch.Tensor, float, float]:
    """Prefill ``prompt``, then run ``steps`` greedy single-token decode steps on the KV cache.

    Prefill and decode are timed separately. The prefill logits give the first new token, each
    decode step one more, so the ids returned are (batch, steps + 1): what ``generate`` gives
    greedily with ``max_new_tokens=steps + 1``.
    """
    device = _device(model)
    prompt = prompt.to(device)
    cache_arg = _cache_argument(model)
    _sync(device)
    start = time.perf_counter()
    output = model(input_ids=prompt, use_cache=True)
    token = output.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    cache, generated = _returned_cache(output), [token]
    start = time.perf_counter()
    for _ in range(steps):
        output = model(input_ids=token, use_cache=True, **{cache_arg: cache})
        cache = _returned_cache(output)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    _sync(device)
    decode = time.perf_counter() - start
    return torch.cat(generated, dim=1), prefill, decode


def _vocab_size(models: list[torch.nn.Module], tokenizer=None) -> int:
    sizes = [int(m.config.vocab_size) for m in models]
    if tokenizer is not None:
        sizes.append(len(tokenizer))
    return min(sizes)


def check_bench_settings(
    batch_sizes, prompt_lengths, decode_tokens: int, repeats: int, warmup: int = 1
) -> None:
    """The settings alone, before any model is loaded."""
    if decode_tokens < 1:
        raise CfspError(f"decode_tokens must be >= 1, got {decode_tokens}")
    if repeats < 1 or warmup < 0:
        raise CfspError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not batch_sizes or not prompt_lengths:
        raise CfspError("give at least one batch size and one prompt length")
    if min(batch_sizes) < 1 or min(prompt_lengths) < 1:
        raise CfspError("batch sizes and prompt lengths must be >= 1")


def check_pair(dense: torch.nn.Module, pruned: torch.nn.Module) -> None:
    """The pruned model must be a pruned version of the dense one; say so when it is not smaller."""
    fields = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    for name in fields:
        a, b = getattr(dense.config, name, None), getattr(pruned.config, name, None)
        if a != b:
            raise CfspError(
                f"the two models differ in {name} ({a} vs {b}): bench compares a model with its own pruned "
                "version; pass the dense model it was pruned from"
            )
    dense_params, pruned_params = count_parameters(dense), count_parameters(pruned)
    if pruned_params >= dense_params:
        log.warning(
            f"the 'pruned' model has {pruned_params:,} parameters, not fewer than the dense "
            f"{dense_params:,}: check the argument order (DENSE PRUNED)"
        )


def _check_positions(models, prompt_lengths, decode_tokens) -> None:
    for model in models:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and max(prompt_lengths) + decode_tokens + 1 > limit:
            raise CfspError(
                f"prompt length {max(prompt_lengths)} + {decode_tokens} decode tokens exceeds the model's "
                f"{limit} positions; use shorter --prompt-lengths"
            )


def _summary(prefill: list[float], decode: list[float], batch: int, length: int, steps: int) -> dict:
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    return {
        "prefill_ms": prefill_s * 1e3,
        "prefill_tokens_per_s": batch * length / prefill_s,
        "decode_ms_per_token": decode_s * 1e3 / steps,
        "decode_tokens_per_s": batch * steps / decode_s,
    }


Runner = Callable[[torch.Tensor, int], tuple[float, float]]  # (prompt, steps) -> (prefill s, decode s)


def torch_runner(model: torch.nn.Module) -> Runner:
    def run(prompt: torch.Tensor, steps: int) -> tuple[float, float]:
        _, prefill, decode = greedy_decode(model, prompt, steps)
        return prefill, decode

    return run


def _setting_row(
    runners: dict[str, Runner], prompt: torch.Tensor, steps: int, repeats: int, warmup: int
) -> dict:
    """Time every model on one prompt batch, alternating in ABBA order, and summarise the medians."""
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in runners}
    for rep in range(warmup + repeats):
        for name in list(runners) if rep % 2 == 0 else list(reversed(runners)):
            prefill, decode = runners[name](prompt, steps)
            if rep >= warmup:
                times[name]["prefill"].append(prefill)
                times[name]["decode"].append(decode)
    batch, length = prompt.shape
    row: dict[str, Any] = {"batch_size": batch, "prompt_length": length, "decode_tokens": steps}
    for name, measured in times.items():
        row[name] = _summary(measured["prefill"], measured["decode"], batch, length, steps)
    dense, pruned = row["dense"], row["pruned"]
    row["prefill_speedup"] = pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
    row["decode_speedup"] = pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return row


def decode_read_parameters(model: torch.nn.Module) -> int:
    """Weights one decoded token reads: every parameter except the input embedding, of which it
    reads one row, and the LM head whole (a tied head is the embedding matrix, read whole there).

    The parameter count overstates a decoder's work where the embedding is large and untied (one
    row of it is read per token): on a 1.5B Qwen2.5 pruned by 50 % llama.cpp decoded 1.56x faster
    against a parameter ratio of 1.48x.
    """
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    total = count_parameters(model)
    return total if tied else total - embedding.numel() + embedding.shape[1]


def speed_benchmark(
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    tokenizer=None,
    batch_sizes: tuple[int, ...] = (1, 4),
    prompt_lengths: tuple[int, ...] = (128, 512),
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Prefill and decode throughput / latency of both models on random prompts, medians of ``repeats``.

    Runs alternate between the models, in ABBA order (the model that goes first flips every
    repeat), so drift and noise hit both equally. Speed-ups are pruned / dense throughput.
    ``decode_ceiling`` = dense / pruned weights a decoded token reads
    (:func:`decode_read_parameters`), the most a weight-bound decoder can gain; ``param_ceiling``
    is the plain parameter ratio.
    """
    models = {"dense": dense, "pruned": pruned}
    check_bench_settings(batch_sizes, prompt_lengths, decode_tokens, repeats, warmup)
    check_pair(dense, pruned)
    _check_positions(list(models.values()), prompt_lengths, decode_tokens)
    vocab = _vocab_size(list(models.values()), tokenizer)
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    runners = {name: torch_runner(model) for name, model in models.items()}
    try:
        rows = _rows(runners, vocab, batch_sizes, prompt_lengths, decode_tokens, repeats, warmup, seed)
    finally:
        for name, model in models.items():
            model.train(modes[name])
    dense_params, pruned_params = count_parameters(dense), count_parameters(pruned)
    device = _device(dense)
    return {
        "rows": rows,
        "dense_params": dense_params,
        "pruned_params": pruned_params,
        "param_ceiling": dense_params / pruned_params,
        "decode_ceiling": decode_read_parameters(dense) / decode_read_parameters(pruned),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(dense.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        **_protocol(repeats, warmup),
        "torch_version": torch.__version__,
    }


def _protocol(repeats: int, warmup: int) -> dict:
    """How both benches time: the same words in both reports."""
    return {
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median",
        "order": "alternating ABBA",
        "decode": "greedy single-token steps on the KV cache, after the prefill (which yields one token)",
    }


def _rows(runners, vocab, batch_sizes, prompt_lengths, decode_tokens, repeats, warmup, seed) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batch_sizes:
        for length in prompt_lengths:
            prompt = torch.randint(0, vocab, (batch, length), generator=generator)
            rows.append(_setting_row(runners, prompt, decode_tokens, repeats, warmup))
    return rows


def llamacpp_speed_benchmark(
    dense: str | os.PathLike,
    pruned: str | os.PathLike,
    prompt_lengths: tuple[int, ...] = (128, 512),
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """:func:`speed_benchmark` for two GGUF files in llama.cpp: one sequence, same ABBA protocol."""
    from cfsp.llamacpp import (
        GreedyRunner,
        gguf_decode_parameters,
        gguf_parameters,
        llama_cpp_module,
        open_model,
    )

    check_bench_settings((1,), prompt_lengths, decode_tokens, repeats, warmup)
    dense_params, pruned_params = gguf_parameters(dense), gguf_parameters(pruned)
    if pruned_params >= dense_params:
        log.warning(
            f"the 'pruned' file has {pruned_params:,} weights, not fewer than the dense {dense_params:,}"
        )
    context = max(prompt_lengths) + decode_tokens + 1
    threads = threads or torch.get_num_threads()
    with open_model(dense, context, threads=threads) as a, open_model(pruned, context, threads=threads) as b:
        if a.n_vocab() != b.n_vocab():
            raise CfspError(
                "the two files have different vocabularies: pass the dense model the pruned one came from"
            )
        runners = {"dense": GreedyRunner(a), "pruned": GreedyRunner(b)}
        rows = _rows(runners, a.n_vocab(), (1,), prompt_lengths, decode_tokens, repeats, warmup, seed)
    return {
        "rows": rows,
        "engine": "llama.cpp",
        "dense_params": dense_params,
        "pruned_params": pruned_params,
        "param_ceiling": dense_params / pruned_params,
        "decode_ceiling": gguf_decode_parameters(dense) / gguf_decode_parameters(pruned),
        "device": "cpu",
        "threads": threads,
        **_protocol(repeats, warmup),
        "llama_cpp_python_version": llama_cpp_module().__version__,
    }


def format_bench_table(result: dict, title: str = "Speed: pruned vs dense") -> Table:
    """A table of :func:`speed_benchmark` output; speed-ups above 1 mean the pruned model is faster."""
    table = Table(
        title=title,
        caption=(
            f"params {result['dense_params']:,} -> {result['pruned_params']:,}; "
            f"decode ceiling {result['decode_ceiling']:.2f}x (parameter ratio {result['param_ceiling']:.2f}x); "
            f"median of {result['repeats']} on {result['device']}"
        ),
    )
    columns = ("batch", "prompt", "prefill tok/s dense", "pruned", "x", "decode tok/s dense", "pruned", "x")
    for column in columns:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        dense, pruned = row["dense"], row["pruned"]
        table.add_row(
            str(row["batch_size"]),
            str(row["prompt_length"]),
            f"{dense['prefill_tokens_per_s']:,.0f}",
            f"{pruned['prefill_tokens_per_s']:,.0f}",
            f"{row['prefill_speedup']:.2f}",
            f"{dense['decode_tokens_per_s']:,.1f}",
            f"{pruned['decode_tokens_per_s']:,.1f}",
            f"{row['decode_speedup']:.2f}",
        )
    return table


# --------------------------------------------------------------------------- pruning cost


def forward_pass_seconds(model: torch.nn.Module, calib_ids: torch.Tensor, batch_size: int = 1) -> float:
    """Wall time of one plain forward pass over the calibration windows (n, L), in batches.

    The yardstick for pruning cost: ``prune_seconds / forward_pass_seconds`` says how many
    forward passes' worth of compute the pruning took.
    """
    if calib_ids.dim() != 2 or batch_size < 1:
        raise CfspError(f"need windows of shape (n, L) and batch_size >= 1, got {tuple(calib_ids.shape)}")
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        start = time.perf_counter()
        for index in range(0, calib_ids.shape[0], batch_size):
            model(calib_ids[index : index + batch_size].to(device), use_cache=False)
        _sync(device)
        return time.perf_counter() - start
    finally:
        model.train(was_training)
