"""Saving and reloading pruned models: three loading paths, identical logits, atomic output."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, make_tiny_model

import cfsp
from cfsp.models import ffn_widths
from cfsp.outdir import PLAN_FILE


def _pruned(family, calib, method="cfsp"):
    model = make_tiny_model(family)
    result = cfsp.prune(
        model, calib, 0.5, method=method, multiple=32 if method == "cfsp" else None, progress=False
    )
    return model, result


@pytest.mark.parametrize("method", ["cfsp", "flap", "magnitude-sp"])
def test_reload_and_apply_plan_give_identical_logits(family, calib, tokenizer, tmp_path, method):
    model, result = _pruned(family, calib, method)
    x = calib[:2, :20]
    with torch.no_grad():
        expected = model(x).logits
    out = cfsp.save_pruned(model, tokenizer, result, tmp_path / "pruned")

    config = json.loads((out / "config.json").read_text())
    widths = {int(k): v["intermediate_size"] for k, v in config["per_layer_config"].items()}
    assert all(widths.get(i, config["intermediate_size"]) == w for i, w in enumerate(result.widths))
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_cfsp.")
    assert config.get("mlp_bias", False) == (result.down_biases is not None) == (method != "magnitude-sp")
    plan = cfsp.read_plan(out)
    assert plan["widths"] == result.widths and plan["method"] == method
    assert plan["kept_channels"] == [k.tolist() for k in result.kept_channels]
    assert {"torch", "transformers"} <= set(plan["versions"])

    reloaded, tok = cfsp.load_pruned(out)
    assert ffn_widths(reloaded) == result.widths
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)
    assert tok("abc").input_ids == tokenizer("abc").input_ids

    if plan["options"]["compensation"] == "refit":  # cfsp's default: weights only in the directory
        with pytest.raises(cfsp.CfspError, match="refit or trained the MLPs"):
            cfsp.apply_plan(make_tiny_model(family), out)
        return
    replayed = cfsp.apply_plan(make_tiny_model(family), out)
    with torch.no_grad():
        assert torch.equal(replayed(x).logits, expected)


@pytest.mark.cli  # a fresh interpreter in a subprocess
def test_directories_load_without_cfsp_through_trust_remote_code(calib, tokenizer, tmp_path):
    x = calib[:2, :20]
    expected = {}
    for family in FAMILIES:
        model, result = _pruned(family, calib, "flap" if family == "qwen2" else "cfsp")
        with torch.no_grad():
            expected[family] = model(x).logits
        cfsp.save_pruned(model, tokenizer, result, tmp_path / family)
    torch.save({"x": x, "expected": expected}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["cfsp"] = None  # any import of cfsp would now fail
import torch
from transformers import AutoModelForCausalLM
data = torch.load({str(tmp_path / "expected.pt")!r})
for family, logits in data["expected"].items():
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + family, trust_remote_code=True)
    assert "cfsp" not in type(model).__module__.split(".")[0]
    with torch.no_grad():
        diff = (model(data["x"]).logits - logits).abs().max().item()
    assert diff == 0.0, (family, diff)
    print(family, "ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [w for f in FAMILIES for w in (f, "ok")]


def test_non_empty_output_is_refused_and_failures_leave_nothing(calib, tokenizer, tmp_path):
    model, result = _pruned("llama", calib)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(cfsp.CfspError, match="not empty.*--overwrite"):
        cfsp.save_pruned(model, tokenizer, result, busy)
    with pytest.raises(cfsp.CfspError, match="not written by cfsp"):
        cfsp.save_pruned(model, tokenizer, result, busy, overwrite=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cfsp.save_pruned(model, Broken(), result, tmp_path / "deep" / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # created parents removed too

    first = cfsp.save_pruned(model, tokenizer, result, tmp_path / "pruned")
    (first / "extra.txt").write_text("from the first run")
    cfsp.save_pruned(model, tokenizer, result, first, overwrite=True)
    assert (first / PLAN_FILE).is_file() and not (first / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "pruned"]


def test_a_directory_without_tokenizer_loads_with_none(calib, tmp_path):
    model, result = _pruned("llama", calib)
    out = cfsp.save_pruned(model, None, result, tmp_path / "no-tokenizer")
    reloaded, tok = cfsp.load_pruned(out)
    assert tok is None and ffn_widths(reloaded) == result.widths
    assert cfsp.load_model(out)[1] is None
    with pytest.raises(cfsp.CfspError, match="needs the model's tokenizer"):
        cfsp.evaluate(reloaded, tok, tasks=["wikitext2"], limit=1, seqlen=16)


def test_plans_are_strict_json_and_invalid_plans_are_one_line(calib, tokenizer, tmp_path):
    model, result = _pruned("llama", calib)
    result.block_importance = [float("nan")] * len(result.widths)
    out = cfsp.save_pruned(model, tokenizer, result, tmp_path / "p")
    text = (out / PLAN_FILE).read_text()
    assert "NaN" not in text and json.loads(text)["block_importance"][0] is None
    plan = json.loads(text)
    broken = [
        ("{not json", "not valid JSON"),
        (json.dumps({k: v for k, v in plan.items() if k != "kept_channels"}), "kept_channels"),
        (json.dumps({**plan, "widths": plan["widths"][:-1]}), "one entry per block"),
        (json.dumps({**plan, "kept_channels": [[0, 0] * (w // 2) for w in plan["widths"]]}), "distinct"),
    ]
    for content, message in broken:
        (out / PLAN_FILE).write_text(content)
        with pytest.raises(cfsp.CfspError, match=message):
            cfsp.load_pruned(out)
    (out / PLAN_FILE).write_text(json.dumps({**plan, "widths": [w - 1 for w in plan["widths"]]}))
    with pytest.raises(cfsp.CfspError):
        cfsp.load_pruned(out)
