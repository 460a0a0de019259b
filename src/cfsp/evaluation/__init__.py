"""Evaluation of dense and pruned models under the field's usual protocol (the evaluation protocol of the CFSP paper).

WikiText-2 test perplexity on non-overlapping windows (``perplexity``); zero-shot accuracy through
lm-evaluation-harness with the task data read from the local data directory rather than the hub
(``tasks``: generated task YAML files that mirror the harness's own prompts and metrics under
``cfsp_*`` names, with ``dataset_path: json`` pointing at the JSONL files). ``evaluate`` runs both
and makes one report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from cfsp.data import data_dir as resolve_data_dir
from cfsp.errors import CfspError
from cfsp.evaluation.perplexity import (
    WIKITEXT_FILE,
    next_token_nll,
    perplexity,
    perplexity_of_ids,
    wikitext_ids,
    window_nll,
)
from cfsp.evaluation.tasks import (
    HEADLINE_METRIC,
    HELLASWAG_NOTE,
    TASK_SPECS,
    TASKS,
    ZERO_SHOT_TASKS,
    harness_version,
    hellaswag_preprocess,
    winogrande_doc_to_choice,
    winogrande_doc_to_target,
    winogrande_doc_to_text,
    zero_shot,
)

__all__ = [
    "HEADLINE_METRIC",
    "HELLASWAG_NOTE",
    "TASKS",
    "TASK_SPECS",
    "WIKITEXT_FILE",
    "ZERO_SHOT_TASKS",
    "check_tasks",
    "evaluate",
    "format_results_table",
    "hellaswag_preprocess",
    "next_token_nll",
    "perplexity",
    "perplexity_of_ids",
    "plan_tasks",
    "wikitext_ids",
    "window_nll",
    "winogrande_doc_to_choice",
    "winogrande_doc_to_target",
    "winogrande_doc_to_text",
    "zero_shot",
    "zero_shot_mean",
]


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
        "harness_version": harness_version(),
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
