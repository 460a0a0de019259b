"""llama.cpp as a runtime: logits, perplexity and timing of exported GGUF files.

Through llama-cpp-python (the optional extra ``cfsp[llamacpp]``, which builds llama.cpp from source
with the machine's C++ compiler). Everything takes token ids, never text, so llama.cpp and
transformers are compared on exactly the same inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cfsp.errors import CfspError


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise CfspError(
            "llama.cpp is not installed; run: pip install 'cfsp[llamacpp]' (it builds llama.cpp, ~10 min on 2 cores)"
        ) from None
    return llama_cpp


def _check_gguf(path: str | os.PathLike) -> Path:
    target = Path(path).expanduser()
    if not target.is_file():
        raise CfspError(f"{target} is not a file; give a .gguf written by `cfsp export`")
    with open(target, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise CfspError(
                f"{target} is not a GGUF file; write one with `cfsp export MODEL --out FILE.gguf`"
            )
    return target


@contextlib.contextmanager
def open_model(
    path: str | os.PathLike,
    n_ctx: int = 512,
    all_logits: bool = False,
    threads: int | None = None,
    flash_attn: bool = False,
) -> Iterator:
    """A loaded ``llama_cpp.Llama`` (closed on exit); ``all_logits`` keeps every position's logits.
    ``flash_attn``: llama.cpp's flash attention, without which it pads every layer's V cache to the
    widest layer's (so blocks without attention would still hold a V cache)."""
    llama_cpp = llama_cpp_module()
    target = _check_gguf(path)
    try:
        model = llama_cpp.Llama(
            model_path=str(target),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=all_logits,
            n_threads=threads or torch.get_num_threads(),
            flash_attn=flash_attn,
            verbose=False,
        )
    except ValueError as exc:
        raise CfspError(f"llama.cpp cannot load {target} ({exc})") from None
    try:
        yield model
    finally:
        model.close()


def gguf_parameters(path: str | os.PathLike) -> int:
    """Weights in a GGUF file, counted from its tensor shapes (the ratio gives the speed ceiling)."""
    from gguf import GGUFReader

    return sum(
        int(t.n_elements) for t in GGUFReader(_check_gguf(path)).tensors if t.name != "rope_freqs.weight"
    )


def gguf_decode_parameters(path: str | os.PathLike) -> int:
    """Weights one decoded token reads in a GGUF file: all but the token embedding, of which one
    row, unless the file has no ``output.weight`` (a tied head reads the embedding whole)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(_check_gguf(path)).tensors if t.name != "rope_freqs.weight"}
    total = sum(int(t.n_elements) for t in tensors.values())
    embedding = tensors.get("token_embd.weight")
    if embedding is None or "output.weight" not in tensors:
        return total
    hidden = int(embedding.shape[0])  # GGUF lists dimensions innermost first: [hidden, vocab]
    return total - int(embedding.n_elements) + hidden


def window_logits(path: str | os.PathLike, windows: torch.Tensor) -> Iterator[torch.Tensor]:
    """Logits [length, vocab] of every position of each window in turn, as llama.cpp computes them
    (one window at a time: a whole evaluation's logits would not fit in memory)."""
    windows = torch.as_tensor(windows)
    with open_model(path, n_ctx=windows.shape[1], all_logits=True) as model:
        for window in windows:
            model.reset()
            model.eval(window.tolist())
            yield torch.from_numpy(np.array(model.scores[: window.shape[0]], dtype=np.float32))


def token_logits(path: str | os.PathLike, windows: torch.Tensor) -> torch.Tensor:
    """Logits [n, length, vocab] of every position of each window."""
    return torch.stack(list(window_logits(path, windows)))


def perplexity(path: str | os.PathLike, windows: torch.Tensor) -> float:
    """Next-token perplexity over ``windows`` [n, length], the same protocol as ``cfsp.evaluation``."""
    from cfsp.evaluation import next_token_nll

    windows = torch.as_tensor(windows)
    nll = sum(
        next_token_nll(logits[:-1], window[1:])
        for logits, window in zip(window_logits(path, windows), windows, strict=True)
    )
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


class GreedyRunner:
    """Times one prefill and a run of single-token decode steps of a loaded GGUF model."""

    def __init__(self, model) -> None:
        self.model = model
        self.llama_cpp = llama_cpp_module()
        self.vocab = model.n_vocab()

    def __call__(self, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
        if prompt.shape[0] != 1:
            raise CfspError("llama.cpp is timed on one sequence at a time; use --batch-sizes 1")
        model = self.model
        model.reset()
        started = time.perf_counter()
        model.eval(prompt[0].tolist())
        token = self._greedy()
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            model.eval([token])
            token = self._greedy()
        return prefill, time.perf_counter() - started

    def _greedy(self) -> int:
        """The most likely next token after the last evaluated one (as the transformers bench does)."""
        logits = self.llama_cpp.llama_get_logits_ith(self.model.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.vocab,))))
