"""Zero-shot tasks through lm-evaluation-harness, reading the local JSONL files: one generated
YAML config per task (the harness's own prompts and metrics), and the helpers those configs name."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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

# The metric each task contributes to the zero-shot mean (the evaluation protocol of the CFSP paper): acc_norm for
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
    "from cfsp.evaluation.tasks import (  # noqa: F401\n"
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


def harness_version() -> str:
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
