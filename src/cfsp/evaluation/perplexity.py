"""WikiText-2 perplexity: the test split tokenized once, cut into non-overlapping windows, and the
mean next-token loss over them (the same windows and loss for transformers and llama.cpp)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cfsp.data import data_file, read_jsonl, token_ids
from cfsp.errors import CfspError

WIKITEXT_FILE = "wikitext2/test.jsonl"


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def window_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False
) -> tuple[float, int]:
    """Summed next-token NLL (nats) and predicted-token count over ``windows`` of shape (n, L).

    Each window is scored on its own (no context carried over), the first token of a window is
    not predicted. Logits are upcast to float32 so half-precision models give stable sums.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise CfspError(f"expected token windows of shape (n, L >= 2), got {tuple(windows.shape)}")
    if batch_size < 1:
        raise CfspError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += next_token_nll(logits, targets)
        count += targets.numel()
    return total, count


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL (nats) of ``targets`` [..., n] under ``logits`` [..., n, vocab] (already shifted)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, targets.reshape(-1).to(flat.device), reduction="sum").item()


def perplexity_of_ids(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    limit: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Perplexity of a 1-D token sequence cut into non-overlapping ``seqlen`` windows.

    The incomplete tail is dropped and ``limit`` keeps the first windows only, as in the reference
    protocol, so numbers are comparable across papers that use the same ``seqlen``.
    """
    ids = ids.reshape(-1)
    if seqlen < 2:
        raise CfspError(f"seqlen must be >= 2, got {seqlen}")
    if limit is not None and limit < 1:
        raise CfspError(f"limit must be >= 1 window, got {limit}")
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise CfspError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen"
        )
    windows = ids[: n * seqlen].reshape(n, seqlen)
    total, count = window_nll(model, windows, batch_size=batch_size, progress=progress)
    return {
        "ppl": math.exp(total / count),
        "nll": total / count,
        "windows": n,
        "seqlen": seqlen,
        "tokens": count,
    }


def wikitext_ids(tokenizer, data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The WikiText-2 test split as one token sequence: rows joined with "\\n\\n", tokenized once."""
    rows = read_jsonl(data_file(WIKITEXT_FILE, data_dir))
    return token_ids(tokenizer, (str(row.get("text", "")) for row in rows), "\n\n")


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    seqlen: int = 1024,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
) -> dict:
    """WikiText-2 test perplexity: rows joined with "\\n\\n", tokenized once, windows of ``seqlen``."""
    path = data_file(WIKITEXT_FILE, data_dir)
    ids = wikitext_ids(tokenizer, data_dir)
    result = perplexity_of_ids(model, ids, seqlen, limit=limit, batch_size=batch_size, progress=True)
    result.update(split="test", file=str(path), metric="ppl", text_tokens=int(ids.numel()))
    return result
