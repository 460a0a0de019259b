"""Perplexity against a by-hand NLL, the local-data harness tasks end to end, and skipping rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_tiny_model
from rich.console import Console

from cfsp.data import data_dir, read_jsonl
from cfsp.errors import CfspError
from cfsp.evaluation import (
    HEADLINE_METRIC,
    TASK_SPECS,
    TASKS,
    check_tasks,
    evaluate,
    format_results_table,
    hellaswag_preprocess,
    perplexity,
    perplexity_of_ids,
    winogrande_doc_to_choice,
    winogrande_doc_to_target,
    winogrande_doc_to_text,
    zero_shot_mean,
)

HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"


def _direct_ppl(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1]
            total += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += window.numel() - 1
    return math.exp(total / count)


def test_perplexity_of_ids_matches_direct_nll(tiny_model):
    ids = torch.randint(4, 260, (100,), generator=torch.Generator().manual_seed(1))
    result = perplexity_of_ids(tiny_model, ids, seqlen=32, batch_size=2)  # 3 windows, partial last batch
    assert result["windows"] == 3 and result["tokens"] == 3 * 31
    assert result["ppl"] == pytest.approx(_direct_ppl(tiny_model, ids[:96].reshape(3, 32)), rel=1e-5)
    first = perplexity_of_ids(tiny_model, ids, seqlen=32, limit=2)
    assert first["windows"] == 2
    assert first["ppl"] == pytest.approx(_direct_ppl(tiny_model, ids[:64].reshape(2, 32)), rel=1e-5)


def test_perplexity_rejects_too_short_text():
    with pytest.raises(CfspError, match="fewer than one window"):
        perplexity_of_ids(make_tiny_model("llama"), torch.arange(4, 20), seqlen=32)


def test_wikitext2_perplexity_on_local_test_file(tokenizer):
    model = make_tiny_model("llama")
    result = perplexity(model, tokenizer, seqlen=64, limit=2)
    assert result["windows"] == 2 and result["seqlen"] == 64 and result["split"] == "test"
    assert result["tokens"] == 2 * 63
    assert 1.0 < result["ppl"] < 1e4 and math.isfinite(result["ppl"])


@pytest.fixture(scope="module")
def harness_run():
    from conftest import make_byte_tokenizer

    tasks = ["piqa", "arc_easy", "hellaswag", "winogrande", "boolq"]
    return evaluate(make_tiny_model("llama"), make_byte_tokenizer(), tasks=tasks, limit=3, batch_size=4)


def test_harness_end_to_end_on_local_files(harness_run):
    results, meta = harness_run["results"], harness_run["meta"]
    assert set(results) == {"piqa", "arc_easy", "hellaswag", "winogrande", "boolq"}
    for task, row in results.items():
        expected = {"acc", "acc_norm"} if task in ("piqa", "arc_easy", "hellaswag") else {"acc"}
        assert expected <= set(row), task
        assert all(0.0 <= row[metric] <= 1.0 for metric in expected)
        assert row["n"] == 3
        assert meta["tasks"][task]["split"] == TASK_SPECS[task].split
        assert meta["tasks"][task]["metric"] == HEADLINE_METRIC[task]
    assert meta["harness_version"] == lm_eval.__version__ and meta["limit"] == 3
    assert "ctx_a" in meta["tasks"]["hellaswag"]["note"]
    assert harness_run["zero_shot_mean"] == pytest.approx(zero_shot_mean(results))
    assert 0.0 <= harness_run["zero_shot_mean"] <= 1.0
    json.dumps(harness_run)  # results must be storable as JSON
    console = Console(record=True, width=120)
    console.print(format_results_table(harness_run))
    assert "winogrande" in console.export_text()


def test_missing_task_file_is_skipped(tmp_path, tokenizer, capsys):
    (tmp_path / "wikitext2").mkdir()
    rows = [{"text": " = Heading = "}, {"text": ""}, {"text": "Some plain words about a river. " * 20}]
    (tmp_path / "wikitext2" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "piqa").mkdir()
    piqa = list(read_jsonl(data_dir() / "piqa/validation.jsonl"))[:2]
    (tmp_path / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))

    result = evaluate(make_tiny_model("llama"), tokenizer, limit=2, seqlen=32, data_dir=tmp_path)
    assert set(result["results"]) == {"wikitext2", "piqa"}
    assert result["results"]["wikitext2"]["windows"] == 2
    assert result["results"]["piqa"]["n"] == 2
    skipped = set(TASKS) - {"wikitext2", "piqa"}
    assert set(result["meta"]["skipped"]) == skipped
    err = capsys.readouterr().err
    assert all(f"skipping {task}" in err for task in skipped)
    assert "boolq/validation.jsonl" in err


def test_unknown_task_raises():
    with pytest.raises(CfspError, match="valid tasks are: wikitext2, boolq"):
        evaluate(make_tiny_model("llama"), None, tasks=["wikitext2", "mmlu"])
    assert check_tasks(["piqa", "piqa", "boolq"]) == ["piqa", "boolq"]
    assert check_tasks(None) == list(TASKS)


# --------------------------------------------------------------------------- fidelity to the harness


def _harness_yaml(relative: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    path = HARNESS_TASKS / relative
    config = yaml.load(path.read_text(), Loader=Loader)
    if "include" in config:
        config = {**_harness_yaml(str(Path(relative).parent / config.pop("include"))), **config}
    return config


@pytest.mark.parametrize(
    "task, relative",
    [
        ("boolq", "super_glue/boolq/default.yaml"),
        ("piqa", "piqa/piqa.yaml"),
        ("hellaswag", "hellaswag/hellaswag.yaml"),
        ("arc_easy", "arc/arc_easy.yaml"),
        ("arc_challenge", "arc/arc_challenge.yaml"),
        ("openbookqa", "openbookqa/openbookqa.yaml"),
        ("winogrande", "winogrande/default.yaml"),
    ],
)
def test_prompts_and_metrics_mirror_the_harness(task, relative):
    theirs, ours = _harness_yaml(relative), TASK_SPECS[task].fields
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        if isinstance(theirs[key], str) and theirs[key].startswith("!function"):
            continue  # checked on data below
        assert ours[key] == theirs[key], (task, key)
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]


def test_winogrande_and_hellaswag_helpers_match_the_harness():
    from lm_eval.tasks.hellaswag import utils as hellaswag
    from lm_eval.tasks.winogrande import preprocess_winogrande as winogrande

    for doc in list(read_jsonl(data_dir() / "winogrande/validation.jsonl"))[:50]:
        assert winogrande_doc_to_text(doc) == winogrande.doc_to_text(doc)
        assert winogrande_doc_to_target(doc) == winogrande.doc_to_target(doc)
        assert winogrande_doc_to_choice(doc) == winogrande.doc_to_choice(doc)
    samples = [" How to cook [title] Boil water.  [step] Stir. ", "Roof: A man is on a roof. he"]
    for doc in list(read_jsonl(data_dir() / "hellaswag/validation.jsonl"))[:50]:
        samples += [doc["activity_label"] + ": " + doc["ctx"], *doc["endings"]]
    for text in samples:
        assert hellaswag_preprocess(text) == hellaswag.preprocess(text)
