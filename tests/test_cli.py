"""The command line end to end on a tiny model saved as a Hugging Face directory."""

import json

import pytest
from conftest import make_byte_tokenizer, make_tiny_model
from typer.testing import CliRunner

import cfsp
from cfsp.cli import app

pytestmark = pytest.mark.cli
runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_byte_tokenizer().save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"sentence number {i} for calibration" for i in range(300)))
    return root, model_dir, corpus


def _prune(workspace, *extra):
    root, model_dir, corpus = workspace
    args = ["prune", "--model", str(model_dir), "--calib-source", str(corpus), "--nsamples", "4"]
    return runner.invoke(app, [*args, "--seqlen", "32", "--multiple", "32", *extra])


def test_prune_prints_summary_and_saves(workspace):
    root = workspace[0]
    done = _prune(workspace, "--out", str(root / "p50"))
    assert done.exit_code == 0, done.output
    assert "realised FFN sparsity" in done.output and "parameters after" in done.output
    plan = cfsp.read_plan(root / "p50")
    assert plan["calibration"] == {"source": str(workspace[2]), "n": 4, "length": 32, "seed": 0}
    again = _prune(workspace, "--out", str(root / "p50"))
    assert again.exit_code == 2 and "not empty" in again.output and "--overwrite" in again.output
    assert _prune(workspace, "--out", str(root / "p50"), "--overwrite").exit_code == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.2"], "sparsity must be in (0, 1)"),
        (["--method", "obc"], "unknown method"),
        (["--seqlen", "100000"], "fewer than one window"),
        (["--bias-compensation"], "use --compensation mean"),
        (["--rounding", "up"], "unknown rounding"),
        (["--compensation", "reconstruct", "--reconstruct-holdout", "0.9"], "reconstruct_holdout must be in"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(workspace, extra, message):
    out = workspace[0] / "never"
    done = _prune(workspace, "--out", str(out), *extra)
    assert done.exit_code == 2
    assert message in done.output and "Traceback" not in done.output
    assert not out.exists()


def test_reconstruction_prints_each_blocks_error_and_records_it(workspace):
    out = workspace[0] / "reconstructed"
    extra = ["--compensation", "reconstruct", "--reconstruct-epochs", "1", "--reconstruct-holdout", "0"]
    done = _prune(workspace, "--out", str(out), "--nsamples", "16", *extra)
    assert done.exit_code == 0, done.output
    assert "reconstruction error" in done.output
    plan = cfsp.read_plan(out)
    assert plan["options"]["reconstruct"]["epochs"] == 1 and len(plan["reconstruction"]) == len(
        plan["widths"]
    )


def test_missing_model_is_one_line(workspace):
    done = runner.invoke(app, ["prune", "--model", "no-such-model", "--out", str(workspace[0] / "x")])
    assert done.exit_code == 2 and "not a named default" in done.output


def test_eval_bench_and_recover_on_the_pruned_directory(workspace):
    root, model_dir, _ = workspace
    pruned = root / "p-eval"
    assert _prune(workspace, "--out", str(pruned)).exit_code == 0
    report = root / "eval.json"
    args = ["eval", str(pruned), "--tasks", "wikitext2,piqa", "--limit", "2", "--seqlen", "32"]
    done = runner.invoke(app, [*args, "--output", str(report)])
    assert done.exit_code == 0, done.output
    results = json.loads(report.read_text())["results"]
    assert results["wikitext2"]["ppl"] > 1 and 0 <= results["piqa"]["acc"] <= 1

    speed = root / "bench.json"
    args = ["bench", str(model_dir), str(pruned), "--batch-sizes", "1", "--prompt-lengths", "16"]
    done = runner.invoke(app, [*args, "--decode-tokens", "4", "--repeats", "1", "--output", str(speed)])
    assert done.exit_code == 0, done.output
    assert json.loads(speed.read_text())["param_ceiling"] > 1

    text = root / "train.txt"
    text.write_text("recovery text for a tiny model. " * 200)
    args = ["recover", str(pruned), "--out", str(root / "rec"), "--data", str(text), "--steps", "2"]
    done = runner.invoke(
        app, [*args, "--rank", "2", "--batch-size", "2", "--grad-accum", "1", "--seqlen", "32"]
    )
    assert done.exit_code == 0, done.output
    plan = cfsp.read_plan(root / "rec")
    assert plan["recovery"]["steps"] == 2 and plan["widths"] == cfsp.read_plan(pruned)["widths"]
    model, _ = cfsp.load_pruned(root / "rec")
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == plan["widths"]

    # Distillation from the model the plan was pruned from, with LoRA and with MLP fine-tuning.
    for train, objective in (("lora", "lm+kd"), ("mlp", "kd")):
        out = root / f"rec-{train}"
        args = [
            "recover",
            str(pruned),
            "--out",
            str(out),
            "--data",
            str(text),
            "--steps",
            "2",
            "--seqlen",
            "32",
        ]
        done = runner.invoke(
            app, [*args, "--batch-size", "2", "--grad-accum", "1", "--train", train, "--objective", objective]
        )
        assert done.exit_code == 0, done.output
        recovery = cfsp.read_plan(out)["recovery"]
        assert (recovery["train"], recovery["config"]["objective"], recovery["steps"]) == (
            train,
            objective,
            2,
        )
        assert recovery["tokens_seen"] > 0
