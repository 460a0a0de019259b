"""``uniform=True``: one width in every block, written as the family's stock checkpoint."""

import json

import pytest
import torch
from conftest import make_byte_tokenizer
from real_models import gemma4_small_config, make_real_model
from transformers import AutoConfig, AutoModelForCausalLM

import cfsp
from cfsp.streaming import prune_directory

pytestmark = pytest.mark.families
STOCK_FILES = {
    "config.json",
    "generation_config.json",
    "pruning_plan.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.mark.parametrize("name", ["qwen3-0.6b", "gemma-3-270m", "phi-4-mini-instruct", "llama-3.2-1b"])
def test_uniform_output_is_a_stock_checkpoint(name, calib, tmp_path):
    model = make_real_model(name)
    result = cfsp.prune(model, calib, 0.5, multiple=32, uniform=True, progress=False)
    assert len(set(result.widths)) == 1 and result.widths[0] % 32 == 0
    assert abs(result.realised_sparsity - 0.5) <= 16 / 256
    with torch.no_grad():
        logits = model(calib[:2]).logits
    cfsp.save_pruned(model, make_byte_tokenizer(), result, tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files - {"model.safetensors"} == STOCK_FILES  # no modeling file, no layouts.py
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] == result.widths[0]
    assert "intermediate_size" not in json.dumps(config.get("per_layer_config") or {})
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no trust_remote_code
    assert type(stock).__module__.startswith("transformers.")
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "out"))
    assert set(stock.state_dict()) == set(fresh.state_dict())  # no tensor the stock model lacks
    with torch.no_grad():
        assert torch.equal(stock(calib[:2]).logits, logits)
    reloaded, _ = cfsp.load_pruned(tmp_path / "out", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, logits)


def test_uniform_streams_like_in_memory(calib, tmp_path):
    source = tmp_path / "source"
    make_real_model("qwen2.5-1.5b-instruct").save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    model, _ = cfsp.load_model(source, device="cpu")
    expected = cfsp.prune(model, calib, 0.4, multiple=32, uniform=True, progress=False)
    result = prune_directory(source, calib, 0.4, tmp_path / "out", device="cpu", multiple=32, uniform=True,
                             progress=False)  # fmt: skip
    assert [k.tolist() for k in result.kept_channels] == [k.tolist() for k in expected.kept_channels]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(stock(calib[:2]).logits, model(calib[:2]).logits)


def test_uniform_refuses_what_a_stock_checkpoint_cannot_hold(calib):
    with pytest.raises(cfsp.CfspError, match="--compensation refit"):
        cfsp.PruneConfig(method="flap", uniform=True)  # FLAP's mean bias
    with pytest.raises(cfsp.CfspError, match="one exact width"):
        cfsp.PruneConfig(uniform=True, rounding="budget")  # would hand leftover multiples to some blocks
    with pytest.raises(cfsp.CfspError, match="drop --allocation"):
        cfsp.PruneConfig(uniform=True, allocation="cfsp")

    model = AutoModelForCausalLM.from_config(gemma4_small_config())
    with pytest.raises(cfsp.CfspError, match="one FFN width"):
        cfsp.prune(model, calib, 0.5, multiple=32, uniform=True, progress=False)


def test_command_line_uniform_prints_the_width_and_writes_a_stock_directory(calib, tmp_path):
    from typer.testing import CliRunner

    from cfsp.cli import app

    source = tmp_path / "source"
    make_real_model("qwen3-0.6b").save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence number {i} for calibration" for i in range(300)))
    args = [
        "prune",
        "--model",
        str(source),
        "--calib-source",
        str(corpus),
        "--nsamples",
        "8",
        "--seqlen",
        "64",
    ]
    done = CliRunner().invoke(app, [*args, "--multiple", "32", "--uniform", "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert "every block keeps 128 channels" in done.output
    assert not (tmp_path / "out" / "modeling_cfsp.py").exists()
    refused = CliRunner().invoke(app, [*args, "--uniform", "--method", "flap", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--compensation refit" in refused.output
