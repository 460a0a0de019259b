"""Recovery data: instruction pairs (the loss sees only the response) or plain text (packed windows)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cfsp.data import named_file, read_jsonl, token_ids
from cfsp.errors import CfspError

IGNORE_INDEX = -100  # label value the causal-LM loss skips

RECOVERY_SOURCES: dict[str, str] = {
    "gpteacher_roleplay": "gpteacher_roleplay/train.jsonl",
    "dolly_hhrlhf_small": "dolly_hhrlhf_small/train.jsonl",
    "wikitext2": "wikitext2/validation.jsonl",
}
# Named sets made of several of the above, concatenated.
RECOVERY_MIXES: dict[str, tuple[str, ...]] = {
    "instructions": ("gpteacher_roleplay", "dolly_hhrlhf_small"),
}

# The Alpaca prompt template (the dolly_hhrlhf_small prompts already contain it).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class RecoveryDataset(torch.utils.data.Dataset):
    """Tokenized recovery examples: ``input_ids``, ``labels`` (-100 where no loss), ``attention_mask``."""

    def __init__(self, examples: list[dict[str, list[int]]], kind: str, source: str, skipped: int = 0):
        self.examples = examples
        self.kind = kind  # "instruction" (response-only loss) or "text" (packed windows)
        self.source = source
        self.skipped = skipped  # instruction rows whose prompt alone filled seqlen

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "examples": len(self), "skipped": self.skipped}


def resolve_recovery_source(source: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """The files of a recovery set: a named set (``gpteacher_roleplay``, ...) or mix
    (``instructions``) in the data directory, or a user file."""
    names = RECOVERY_MIXES.get(str(source), (source,))
    paths = [named_file(name, RECOVERY_SOURCES, "recovery data", root) for name in names]
    for path in paths:
        if path.suffix not in (".jsonl", ".txt"):
            raise CfspError(f"recovery data {path} must be a .jsonl or .txt file")
    return paths


def _numbered_rows(path: Path) -> list[tuple[int, dict]]:
    """JSONL rows with their line numbers (blank lines skipped, as ``read_jsonl`` does)."""
    with open(path, encoding="utf-8") as handle:
        numbers = [n for n, line in enumerate(handle, start=1) if line.strip()]
    return list(zip(numbers, read_jsonl(path), strict=False))


_FIELDS = {"alpaca": ("instruction", "output"), "prompt": ("prompt", "response"), "text": ("text",)}


def _row_format(path: Path, line: int, row: dict) -> str:
    """Which schema a JSONL file uses, judged by its first row."""
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt"
    if "text" in row:
        return "text"
    raise CfspError(
        f"{path}, line {line}: unknown row schema (fields {', '.join(sorted(row)) or 'none'}); use "
        "instruction/input/output, prompt/response or text"
    )


def _field(path: Path, line: int, row: dict, name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise CfspError(f"{path}, line {line}: missing field {name!r}; every row needs the same fields")
        return ""
    if not isinstance(value, str):
        raise CfspError(f"{path}, line {line}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def format_instruction(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for one instruction (with or without an input)."""
    if input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def instruction_examples(
    prompts: Sequence[str], responses: Sequence[str], tokenizer, seqlen: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Prompt + response + eos, truncated to ``seqlen``; the loss sees only response (and eos) tokens.

    Prompt and response are tokenized separately so the prompt/response boundary is exact. Rows
    whose prompt alone fills ``seqlen`` carry no loss and are skipped (their count is returned).
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, skipped = [], 0
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        if len(prompt) >= seqlen:
            skipped += 1
            continue
        ids = (list(prompt) + list(response) + eos)[:seqlen]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return examples, skipped


def text_examples(text: str, tokenizer, seqlen: int) -> list[dict[str, list[int]]]:
    """Causal-LM windows: the text tokenized once, cut into consecutive windows of ``seqlen`` tokens."""
    ids = token_ids(tokenizer, [text], "").tolist()
    windows = [ids[start : start + seqlen] for start in range(0, len(ids), seqlen)]
    windows = [w for w in windows if len(w) >= 2]  # a 1-token tail has nothing to predict
    return [{"input_ids": w, "labels": list(w), "attention_mask": [1] * len(w)} for w in windows]


def load_recovery_data(
    source: str | os.PathLike,
    tokenizer,
    seqlen: int = 256,
    max_samples: int | None = None,
    data_root: str | os.PathLike | None = None,
) -> RecoveryDataset:
    """Tokenize a recovery set: instruction JSONL (response-only loss) or plain text (packed windows).

    ``instruction/input/output`` rows get the Alpaca template; ``prompt/response`` rows use the
    prompt as-is; ``text`` rows (or a ``.txt`` file) are joined with blank lines and packed.
    ``max_samples`` keeps the first rows (instruction) or windows (text) of each file; a mix
    concatenates its files' examples (the Trainer shuffles them).
    """
    if seqlen < 2:
        raise CfspError(f"recovery seqlen must be >= 2 tokens, got {seqlen}")
    parts = [
        _load_file(path, tokenizer, seqlen, max_samples)
        for path in resolve_recovery_source(source, data_root)
    ]
    if len(parts) == 1:
        return parts[0]
    kinds = {part.kind for part in parts}
    return RecoveryDataset(
        [example for part in parts for example in part.examples],
        kinds.pop() if len(kinds) == 1 else "mixed",
        " + ".join(part.source for part in parts),
        sum(part.skipped for part in parts),
    )


def _load_file(path: Path, tokenizer, seqlen: int, max_samples: int | None) -> RecoveryDataset:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise CfspError(f"recovery data {path} is empty; give a file with text in it")
        return _text_dataset(text, tokenizer, seqlen, max_samples, path)
    rows = _numbered_rows(path)
    if not rows:
        raise CfspError(f"recovery data {path} has no rows; give a JSONL file with one object per line")
    kind = _row_format(path, *rows[0])
    for line, row in rows:
        for name in _FIELDS[kind]:
            _field(path, line, row, name)
    if kind == "text":
        text = "\n\n".join(row["text"] for _, row in rows)
        if not text.strip():
            raise CfspError(f"recovery data {path} has only empty 'text' rows")
        return _text_dataset(text, tokenizer, seqlen, max_samples, path)
    if max_samples is not None:
        rows = rows[:max_samples]
    if kind == "alpaca":
        prompts = [
            format_instruction(row["instruction"], _field(path, line, row, "input", required=False))
            for line, row in rows
        ]
        responses = [row["output"] for _, row in rows]
    else:
        prompts = [row["prompt"] for _, row in rows]
        responses = [row["response"] for _, row in rows]
    examples, skipped = instruction_examples(prompts, responses, tokenizer, seqlen)
    if not examples:
        raise CfspError(f"every prompt in {path} is at least {seqlen} tokens long; raise --seqlen")
    return RecoveryDataset(examples, "instruction", str(path), skipped)


def _text_dataset(text: str, tokenizer, seqlen: int, max_samples: int | None, path: Path) -> RecoveryDataset:
    examples = text_examples(text, tokenizer, seqlen)
    if not examples:
        raise CfspError(f"recovery text {path} has fewer than 2 tokens; give a longer text")
    return RecoveryDataset(examples[:max_samples] if max_samples else examples, "text", str(path))


class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, ``attention_mask`` with 0."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        return {
            key: torch.tensor(
                [list(f[key]) + [pad] * (width - len(f[key])) for f in features], dtype=torch.long
            )
            for key, pad in pads.items()
        }


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else eos, else 0 (masked out anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
