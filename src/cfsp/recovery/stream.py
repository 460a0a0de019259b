"""A corpus too large to load: a folder of text shards, read and packed into windows as training goes.

Distillation wants general text in quantity (hundreds of millions of tokens), which no one holds
in memory. ``TextStream`` reads a folder of ``.jsonl`` (a ``text`` field per line), ``.txt`` (one
document per file) and ``.parquet`` (a ``text`` column) shards in sorted path order, or a saved
``datasets`` directory, tokenizes document by document, joins documents with the end-of-text token
and cuts the running tokens into ``seqlen`` windows. When the corpus runs out it starts again.

The window order is the same whatever the number of processes: every process reads the same
stream and trains on its own windows of it (the training loop picks them), so a run resumes on
another process count at the very window it stopped at, and data-parallel training sees exactly
the windows one process would. Tokenizing is cheap next to a training step, so reading the stream
in every process costs little.

The first ``held_out`` windows are never trained on: they are the evaluation slice. A line that is
not valid JSON, or has no string ``text``, is skipped and counted (``skipped``), with a warning
naming its file and line; a corpus where nothing can be read is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from cfsp.data import json_lines
from cfsp.errors import CfspError

SHARD_SUFFIXES = (".jsonl", ".txt", ".parquet")
DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_TOKENIZE_BATCH = 64  # documents tokenized per call
_WARNINGS_SHOWN = 5
log = logging.getLogger("cfsp")


def is_datasets_dir(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in DATASETS_MARKERS)


def shard_files(folder: Path) -> list[Path]:
    """The shards of a corpus folder, in sorted path order (subfolders included)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SHARD_SUFFIXES)
    if not files:
        raise CfspError(
            f"recovery data folder {folder} has no {', '.join(SHARD_SUFFIXES)} files and is not a saved "
            "datasets directory; put text shards in it"
        )
    return files


class TextStream:
    """Packed ``seqlen``-token windows of a corpus folder, endlessly; see the module docstring."""

    kind = "stream"

    def __init__(
        self, folder: str | os.PathLike, tokenizer, seqlen: int, held_out: int = 0, quiet: bool = False
    ):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise CfspError(f"recovery data folder {self.folder} does not exist")
        self.source = str(self.folder)
        self.tokenizer, self.seqlen, self.held_out, self.quiet = tokenizer, seqlen, held_out, quiet
        self.eos = tokenizer.eos_token_id
        self.skipped = 0
        self.passes = 0  # completed passes over the corpus
        self._first_document()  # a corpus with nothing readable fails now, not at the first step

    # -- documents

    def documents(self) -> Iterator[str]:
        """Every document's text, shard by shard."""
        if is_datasets_dir(self.folder):
            yield from self._datasets_texts()
            return
        for path in shard_files(self.folder):
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8", errors="replace")
            elif path.suffix == ".parquet":
                yield from self._parquet_texts(path)
            else:
                yield from self._jsonl_texts(path)

    def _skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if not self.quiet and self.skipped <= _WARNINGS_SHOWN:
            more = " (further skipped lines are only counted)" if self.skipped == _WARNINGS_SHOWN else ""
            log.warning("skipped %s: %s%s", where, why, more)

    def _jsonl_texts(self, path: Path) -> Iterator[str]:
        for number, row in json_lines(path):
            if isinstance(row, json.JSONDecodeError):
                self._skip(f"{path}, line {number}", f"not valid JSON ({row.msg})")
                continue
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                self._skip(f"{path}, line {number}", "no string 'text' field")
                continue
            yield text

    def _parquet_texts(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            shard = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise CfspError(f"{path}: not a readable parquet file ({exc})") from None
        if "text" not in shard.schema_arrow.names:
            raise CfspError(f"{path}: no 'text' column (columns: {', '.join(shard.schema_arrow.names)})")
        for batch in shard.iter_batches(columns=["text"], batch_size=256):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text
                else:
                    self._skip(str(path), "a row whose text is not a string")

    def _datasets_texts(self) -> Iterator[str]:
        import datasets

        loaded = datasets.load_from_disk(str(self.folder))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise CfspError(
                    f"{self.folder}: a dataset dict without a 'train' split ({', '.join(loaded)})"
                )
            loaded = loaded["train"]
        if "text" not in loaded.column_names:
            raise CfspError(f"{self.folder}: no 'text' column (columns: {', '.join(loaded.column_names)})")
        for text in loaded["text"]:
            if isinstance(text, str):
                yield text
            else:
                self._skip(str(self.folder), "a row whose text is not a string")

    def _first_document(self) -> None:
        for text in self.documents():
            if text.strip():
                return
        raise CfspError(f"recovery data {self.folder} holds no readable text; check its shards")

    # -- windows

    def _one_pass(self) -> Iterator[dict[str, list[int]]]:
        buffer: list[int] = []
        batch: list[str] = []

        def pack(texts: list[str]):
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                buffer.extend(ids)
                if self.eos is not None:
                    buffer.append(self.eos)
            while len(buffer) >= self.seqlen:
                window = buffer[: self.seqlen]
                del buffer[: self.seqlen]
                yield {"input_ids": window, "labels": list(window), "attention_mask": [1] * self.seqlen}

        for text in self.documents():
            if text.strip():
                batch.append(text)
            if len(batch) == _TOKENIZE_BATCH:
                yield from pack(batch)
                batch = []
        if batch:
            yield from pack(batch)

    def held_out_examples(self) -> list[dict[str, list[int]]]:
        """The evaluation slice: the corpus's first ``held_out`` windows."""
        out = []
        for window in self._one_pass():
            if len(out) == self.held_out:
                break
            out.append(window)
        return out

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        """Training windows, pass after pass, the held-out ones left out each time."""
        while True:
            produced = 0
            for index, window in enumerate(self._one_pass()):
                if index >= self.held_out:
                    produced += 1
                    yield window
            if produced == 0:
                raise CfspError(
                    f"recovery data {self.folder} gives no training windows of {self.seqlen} tokens after "
                    f"the {self.held_out} held out; add text or lower --seqlen / --eval-windows"
                )
            self.passes += 1
            if not self.quiet:
                log.info(
                    "recovery data: pass %d over %s done (%d windows); starting again",
                    self.passes,
                    self.folder,
                    produced,
                )

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "skipped": self.skipped, "passes": self.passes}
