"""Evaluation of dense and pruned models under the field's usual protocol (CFSP.md section 8).

WikiText-2 test perplexity is computed here on non-overlapping windows. Zero-shot accuracy goes
through lm-evaluation-harness, but with the task data read from the local data directory rather
than the hub: task YAML files are generated in a temporary folder that mirror the harness's own
prompts and metrics under ``cfsp_*`` names, with ``dataset_path: json`` pointing at our JSONL files.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from tqdm.auto import tqdm

from cfsp.data import data_dir as resolve_data_dir
from cfsp.data import data_file, read_jsonl, token_ids
from cfsp.errors import CfspError

WIKITEXT_FILE = "wikitext2/test.jsonl"
ZERO_SHOT_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
TASKS: tuple[str, ...] = ("wikitext2", *ZERO_SHOT_TASKS)

# The metric each task contributes to the zero-shot mean (CFSP.md section 8): acc_norm for
# HellaSwag, ARC-Challenge and OpenBookQA, acc for the others.
HEADLINE_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}

HELLASWAG_NOTE = (
    "local HellaSwag lacks ctx_a/ctx_b, so the prompt is '{activity_label}: {ctx}' without the "
    "harness's capitalisation of ctx_b; scores are close to, not identical with, lm-eval hellaswag"
)


# --------------------------------------------------------------------------- perplexity


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


# --------------------------------------------------------------------------- harness task functions
# Referenced from the generated YAML (through a small re-export file next to it), so they must be
# importable module-level functions. They reproduce the harness's winogrande and hellaswag helpers.


def winogrande_doc_to_text(doc: dict) -> int:
    """Partial evaluation: the *context* varies (one per option) and the index of the gold one is returned."""
    return {"1": 0, "2": 1}[str(doc["answer"]).strip()]


def winogrande_doc_to_target(doc: dict) -> str:
    """The shared continuation: the sentence after the blank."""
    blank = doc["sentence"].index("_") + 1
    return doc["sentence"][blank:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    """One context per option: the sentence up to the blank with the option filled in."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up of WikiHow artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    """Build ``query``, ``choices`` and ``gold`` from the local schema (activity_label, ctx, endings)."""

    def one(doc: dict) -> dict:
        return {
            "query": hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx"]),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


_UTILS_MODULE = "cfsp_task_utils"
_UTILS_SOURCE = (
    '"""Re-exports the task helpers of cfsp.evaluation for the generated task YAML files."""\n'
    "from cfsp.evaluation import (  # noqa: F401\n"
    "    hellaswag_process_docs,\n"
    "    winogrande_doc_to_choice,\n"
    "    winogrande_doc_to_target,\n"
    "    winogrande_doc_to_text,\n"
    ")\n"
)


@dataclass(frozen=True)
class _Function:
    """A ``!function`` reference in a generated YAML file."""

    name: str


_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


@dataclass(frozen=True)
class TaskSpec:
    """Where a zero-shot task's data lives and the harness prompt/metric fields that mirror its task."""

    file: str
    split: str
    harness_task: str
    fields: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


TASK_SPECS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(
        "boolq/validation.jsonl",
        "validation",
        "boolq (super_glue)",
        {
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": ["no", "yes"],
            "metric_list": _ACC,
        },
    ),
    "piqa": TaskSpec(
        "piqa/validation.jsonl",
        "validation",
        "piqa",
        {
            "doc_to_text": "Question: {{goal}}\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": "{{[sol1, sol2]}}",
            "metric_list": _ACC_NORM,
        },
    ),
    "hellaswag": TaskSpec(
        "hellaswag/validation.jsonl",
        "validation",
        "hellaswag",
        {
            "process_docs": _Function("hellaswag_process_docs"),
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "choices",
            "metric_list": _ACC_NORM,
        },
        note=HELLASWAG_NOTE,
    ),
    "winogrande": TaskSpec(
        "winogrande/validation.jsonl",
        "validation",
        "winogrande",
        {
            "doc_to_text": _Function("winogrande_doc_to_text"),
            "doc_to_target": _Function("winogrande_doc_to_target"),
            "doc_to_choice": _Function("winogrande_doc_to_choice"),
            "metric_list": _ACC,
        },
    ),
    "arc_easy": TaskSpec(
        "arc_easy/test.jsonl",
        "test",
        "arc_easy",
        {
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": _ACC_NORM,
        },
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge/test.jsonl",
        "test",
        "arc_challenge",
        {
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": _ACC_NORM,
        },
    ),
    "openbookqa": TaskSpec(
        "openbookqa/test.jsonl",
        "test",
        "openbookqa",
        {
            "doc_to_text": "question_stem",
            "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": _ACC_NORM,
        },
    ),
}


def harness_task_name(task: str) -> str:
    """Our own name for a task, so it cannot clash with the harness's hub-backed one."""
    return f"cfsp_{task}"


def _yaml_value(value: Any) -> str:
    # JSON is valid YAML flow syntax, so plain values are written as JSON; functions get a tag.
    if isinstance(value, _Function):
        return f"!function {_UTILS_MODULE}.{value.name}"
    return json.dumps(value)


def task_yaml(task: str, path: Path) -> str:
    """The YAML config of ``task`` reading ``path`` (absolute) as its evaluation split."""
    spec = TASK_SPECS[task]
    config: dict[str, Any] = {
        "task": harness_task_name(task),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(path.resolve())}},
        "output_type": "multiple_choice",
        f"{spec.split}_split": spec.split,
        **spec.fields,
        "metadata": {"version": 1.0},
    }
    return "".join(f"{key}: {_yaml_value(value)}\n" for key, value in config.items())


def write_task_configs(tasks: list[str], paths: dict[str, Path], folder: Path) -> None:
    """Write one YAML per task and the helper module they reference into ``folder``."""
    (folder / f"{_UTILS_MODULE}.py").write_text(_UTILS_SOURCE, encoding="utf-8")
    for task in tasks:
        (folder / f"{harness_task_name(task)}.yaml").write_text(
            task_yaml(task, paths[task]), encoding="utf-8"
        )


# --------------------------------------------------------------------------- zero-shot


def _harness_version() -> str:
    import lm_eval

    return str(getattr(lm_eval, "__version__", "unknown"))


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str],
    paths: dict[str, Path],
    limit: int | None = None,
    batch_size: int | str = 1,
) -> dict[str, dict]:
    """Run the given zero-shot tasks through lm-evaluation-harness on the local files.

    Returns ``{task: {"acc": ..., "acc_norm": ..., "acc_stderr": ..., "n": ...}}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        return {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="cfsp_tasks_") as folder:
        write_task_configs(tasks, paths, Path(folder))
        manager = TaskManager(include_path=folder, include_defaults=False)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=[harness_task_name(task) for task in tasks],
            task_manager=manager,
            limit=limit,
            log_samples=False,
        )
    if output is None:  # only on non-zero ranks of a distributed run
        return {}
    results: dict[str, dict] = {}
    for task in tasks:
        name = harness_task_name(task)
        raw = output["results"][name]
        row: dict[str, Any] = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in raw:
                row[metric] = float(raw[f"{metric},none"])
                stderr = raw.get(f"{metric}_stderr,none")
                if isinstance(stderr, int | float):
                    row[f"{metric}_stderr"] = float(stderr)
        samples = output.get("n-samples", {}).get(name, {})
        row["n"] = int(samples.get("effective", samples.get("original", 0)))
        results[task] = row
    return results


# --------------------------------------------------------------------------- evaluate


def check_tasks(tasks: list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate task names (default: all), keeping the given order and dropping repeats."""
    if tasks is None:
        return list(TASKS)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise CfspError(f"unknown task(s) {', '.join(unknown)}; valid tasks are: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def zero_shot_mean(results: dict[str, dict]) -> float | None:
    """Mean over the zero-shot tasks present of their headline metric (``HEADLINE_METRIC``)."""
    values = [
        results[task][HEADLINE_METRIC[task]]
        for task in ZERO_SHOT_TASKS
        if task in results and HEADLINE_METRIC[task] in results[task]
    ]
    return sum(values) / len(values) if values else None


def plan_tasks(
    tasks: list[str] | tuple[str, ...] | None,
    limit: int | None = None,
    seqlen: int = 1024,
    batch_size: int = 1,
    data_dir: str | os.PathLike | None = None,
) -> tuple[Path, list[str], dict[str, str]]:
    """Check evaluation settings before any work: (data directory, runnable tasks, skipped ones).

    A task whose data file is missing is skipped with its reason; if none is left, that is an error.
    """
    names = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise CfspError(f"limit must be >= 1, got {limit}")
    if seqlen < 2:
        raise CfspError(f"seqlen must be >= 2, got {seqlen}")
    if batch_size < 1:
        raise CfspError(f"batch size must be >= 1, got {batch_size}")
    root = resolve_data_dir(data_dir)
    present, skipped = [], {}
    for task in names:
        path = root / (WIKITEXT_FILE if task == "wikitext2" else TASK_SPECS[task].file)
        if path.is_file():
            present.append(task)
        else:
            skipped[task] = f"missing data file {path}"
    if not present:
        raise CfspError(
            f"none of the tasks {', '.join(names)} has its data file in {root}; check --data-dir / CFSP_DATA_DIR"
        )
    return root, present, skipped


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] | None = None,
    limit: int | None = None,
    seqlen: int = 1024,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
) -> dict:
    """Perplexity and zero-shot accuracy with the metadata that makes numbers comparable.

    ``limit`` is the number of perplexity windows and the number of examples per zero-shot task.
    A task whose data file is missing is reported and skipped; the others still run.
    """
    root, present, skipped = plan_tasks(tasks, limit, seqlen, batch_size, data_dir)
    if tokenizer is None:
        raise CfspError("evaluation needs the model's tokenizer, and this model has none")
    for task, reason in skipped.items():
        print(f"skipping {task}: {reason}", file=sys.stderr)
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    meta: dict[str, Any] = {
        "harness_version": _harness_version(),
        "limit": limit,
        "seqlen": seqlen,
        "batch_size": batch_size,
        "num_fewshot": 0,
        "data_dir": str(root),
        "zero_shot_rule": dict(HEADLINE_METRIC),
        "tasks": {},
        "skipped": dict(skipped),
    }

    chosen = [task for task in present if task != "wikitext2"]
    try:
        if "wikitext2" in present:
            ppl = perplexity(
                model, tokenizer, seqlen=seqlen, limit=limit, data_dir=root, batch_size=batch_size
            )
            results["wikitext2"] = {key: ppl[key] for key in ("ppl", "windows", "tokens")}
            meta["tasks"]["wikitext2"] = {
                "split": "test",
                "file": WIKITEXT_FILE,
                "metric": "ppl",
                "seqlen": seqlen,
                "windows": ppl["windows"],
                "protocol": "rows joined with '\\n\\n', tokenized once, non-overlapping windows",
            }
        paths = {task: root / TASK_SPECS[task].file for task in chosen}
        results.update(zero_shot(model, tokenizer, chosen, paths, limit=limit, batch_size=batch_size))
    finally:
        model.train(was_training)

    for task in chosen:
        spec = TASK_SPECS[task]
        info = {
            "split": spec.split,
            "file": spec.file,
            "metric": HEADLINE_METRIC[task],
            "n": results.get(task, {}).get("n"),
            "prompt": f"as lm-eval {spec.harness_task}",
        }
        if spec.note:
            info["note"] = spec.note
        meta["tasks"][task] = info
    return {"results": results, "zero_shot_mean": zero_shot_mean(results), "meta": meta}


# --------------------------------------------------------------------------- display


def format_results_table(evaluation: dict, title: str = "Evaluation") -> Table:
    """A table of one evaluation (the dict :func:`evaluate` returns) for the CLI."""
    results = evaluation.get("results", evaluation)
    meta = evaluation.get("meta", {})
    table = Table(title=title)
    for column in ("task", "split", "metric", "value", "n"):
        table.add_column(column, justify="right" if column in ("value", "n") else "left")
    tasks_meta = meta.get("tasks", {})
    for task in TASKS:
        if task not in results:
            continue
        row, info = results[task], tasks_meta.get(task, {})
        if task == "wikitext2":
            split = info.get("split", "test")
            table.add_row(
                task, split, f"ppl (L={info.get('seqlen', '?')})", f"{row['ppl']:.3f}", str(row["windows"])
            )
            continue
        split = info.get("split", TASK_SPECS[task].split)
        for metric in ("acc", "acc_norm"):
            if metric in row:
                mark = " *" if metric == HEADLINE_METRIC[task] else ""
                table.add_row(task, split, metric + mark, f"{row[metric]:.4f}", str(row.get("n", "")))
    mean = evaluation.get("zero_shot_mean")
    if mean is not None:
        table.add_row("zero-shot mean", "", "* metrics", f"{mean:.4f}", "")
    for task, reason in meta.get("skipped", {}).items():
        table.add_row(task, "", "skipped", reason, "")
    return table
