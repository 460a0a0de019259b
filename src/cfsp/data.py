"""Where the data lives and how calibration windows are drawn.

The data directory holds plain JSONL files (WikiText-2, zero-shot tasks, recovery sets). It is
resolved once, in one place: an explicit argument, then ``CFSP_DATA_DIR``, then the copy shipped
inside the package (``cfsp/datasets``, see its MANIFEST.md), so a fresh clone or install works.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from cfsp.errors import CfspError

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "datasets"

# Named text sources: name -> (relative file, how its rows are joined). Calibration uses the
# validation split because the WikiText-2 train split is not available offline; evaluation uses test.
TEXT_SOURCES: dict[str, str] = {
    "wikitext2": "wikitext2/validation.jsonl",
    "wikitext2-validation": "wikitext2/validation.jsonl",
    "wikitext2-test": "wikitext2/test.jsonl",
}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """Resolve the data directory: argument, then ``$CFSP_DATA_DIR``, then the shipped copy."""
    candidate = path or os.environ.get("CFSP_DATA_DIR") or DEFAULT_DATA_DIR
    resolved = Path(candidate).expanduser()
    if not resolved.is_dir():
        raise CfspError(
            f"data directory {resolved} does not exist; pass --data-dir or set CFSP_DATA_DIR "
            "to the folder that holds wikitext2/, piqa/, ..."
        )
    return resolved


def data_file(relative: str, root: str | os.PathLike | None = None) -> Path:
    """A file inside the data directory, with a clear error when it is missing."""
    path = data_dir(root) / relative
    if not path.is_file():
        raise CfspError(f"missing data file {path}; check --data-dir / CFSP_DATA_DIR")
    return path


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value or the JSONDecodeError)`` for each non-blank line of a JSONL
    file: the caller decides whether a bad line stops it (``read_jsonl``) or is skipped (streams)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, exc


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield JSON objects from a JSONL file; a malformed line is reported by its number."""
    for number, row in json_lines(path):
        if isinstance(row, json.JSONDecodeError):
            raise CfspError(f"{path}, line {number}: not valid JSON ({row.msg})")
        if not isinstance(row, dict):
            raise CfspError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        yield row


def named_file(
    source: str | os.PathLike, names: dict[str, str], what: str, root: str | os.PathLike | None = None
) -> Path:
    """A named file in the data directory (``names``: name -> relative path), or a user file."""
    name = str(source)
    if name in names:
        return data_file(names[name], root)
    path = Path(name).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(names))
        raise CfspError(f"{what} {name!r} is neither a known name ({known}) nor an existing file")
    return path


def text_source_path(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The file behind a named text source or a user path; fails (one line) if there is none."""
    return named_file(source, TEXT_SOURCES, "text source", root)


def check_windows(n: int, length: int) -> None:
    if n < 1 or length < 2:
        raise CfspError(f"need n >= 1 windows of length >= 2 tokens, got n={n}, length={length}")


def text_rows(source: str | os.PathLike, root: str | os.PathLike | None = None) -> list[str]:
    """Rows of text from a named source (``wikitext2``...) or a user ``.txt`` / ``.jsonl`` file.

    JSONL rows contribute their ``text`` field; a ``.txt`` file contributes its lines.
    """
    path = text_source_path(source, root)
    if path.suffix == ".jsonl":
        rows = []
        for number, row in enumerate(read_jsonl(path), start=1):
            if "text" not in row:
                raise CfspError(f"{path}, row {number}: JSONL text sources need a 'text' field")
            rows.append(str(row["text"]))
        return rows
    return path.read_text(encoding="utf-8").splitlines()


def token_ids(tokenizer, rows: Iterable[str], separator: str) -> torch.LongTensor:
    """Rows of running text joined with ``separator`` and tokenized once, with the tokenizer's
    default special tokens: the one tokenization behind calibration (rows joined with a space, as
    the reference does), perplexity and packed recovery text (blank lines, the WikiText protocol)."""
    return tokenizer(separator.join(rows), return_tensors="pt").input_ids[0]


def calibration_windows(
    tokenizer,
    source: str | os.PathLike = "wikitext2",
    n: int = 128,
    length: int = 1024,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> torch.LongTensor:
    """``n`` windows of ``length`` tokens, sampled as the reference does.

    Rows are joined with a single space and tokenized once; each window start is drawn uniformly
    from ``[0, T - length - 1]`` with Python's ``random`` seeded by ``seed``.
    """
    check_windows(n, length)
    if tokenizer is None:
        raise CfspError("calibration needs the model's tokenizer, and this model has none")
    ids = token_ids(tokenizer, text_rows(source, data_dir), " ")
    total = ids.numel()
    if total <= length + 1:
        raise CfspError(
            f"calibration text {source!s} has {total} tokens, fewer than one window of {length} + 2; "
            "use a longer text or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - length - 1) for _ in range(n)]
    return torch.stack([ids[s : s + length] for s in starts])


def describe_windows(source: str | os.PathLike, n: int, length: int, seed: int) -> dict:
    """What a set of calibration windows was, for the pruning plan."""
    return {"source": str(source), "n": n, "length": length, "seed": seed}
