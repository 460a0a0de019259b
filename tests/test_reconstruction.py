"""Reconstruction: each pruned MLP trained to the dense outputs, block by block."""

import json

import pytest
import torch
from conftest import make_tiny_model

import cfsp
from cfsp.calibration import BlockStep, run_blocks
from cfsp.errors import CfspError
from cfsp.models import block_mlp, decoder_blocks
from cfsp.reconstruction import _adds_mlp_output, reconstruct_mlp
from cfsp.statistics import BlockStats, MlpRecorder

RECONSTRUCT = dict(compensation="reconstruct", multiple=32, reconstruct_epochs=3, progress=False)


def _with_mlp_records(model, calib, each) -> None:
    """A block pass that records every MLP's activations and calls ``each(index, stats)``."""
    records = [BlockStats() for _ in decoder_blocks(model)]

    class Each(BlockStep):
        def finish(self, run):
            return each(run.index, records[run.index])

    run_blocks(model, calib, [MlpRecorder(records), Each()], progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_block_that_keeps_every_channel_is_left_as_it_is(calib):
    """Its MLP already gives the dense output: no epoch beats a zero loss, so not a bit changes."""
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reports = []
    config = cfsp.PruneConfig.from_options(
        compensation="reconstruct", reconstruct_target="mlp", reconstruct_holdout=0.25
    ).reconstruct

    def train(index, stats):
        reports.append(
            reconstruct_mlp(decoder_blocks(model)[index], stats.mlp, index, config, progress=False)
        )
        return False

    _with_mlp_records(model, calib, train)
    assert all(r.kept_refit and r.loss_before == 0.0 for r in reports)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "variant",
    [
        dict(reconstruct_holdout=0.0, reconstruct_inputs="dense", reconstruct_target="mlp"),
        dict(),
    ],  # and defaults
)
def test_reconstruction_never_ends_above_the_refit_and_freezes_the_rest(family, calib, variant):
    refit = make_tiny_model(family)
    cfsp.prune(refit, calib, 0.5, multiple=32, progress=False)
    model = make_tiny_model(family)
    result = cfsp.prune(model, calib, 0.5, **RECONSTRUCT, **variant)
    reports = result.reconstruction
    assert len(reports) == sum(w < d for w, d in zip(result.widths, result.original_widths, strict=True))
    for r in reports:
        watched = "heldout" if r["heldout_before"] is not None else "loss"  # what picks the epoch
        assert r[f"{watched}_after"] <= r[f"{watched}_before"] and r["epochs"] >= 1
        assert r["target"] == variant.get("reconstruct_target", "block")  # both fixture blocks decompose
    if variant.get("reconstruct_holdout") == 0.0:  # tiny random windows: held-out losses rarely improve
        assert any(not r["kept_refit"] for r in reports)  # some block did train
    trained = refit.state_dict()
    for name, value in model.state_dict().items():
        if ".mlp." not in name:  # norms, attention, embeddings: bit-identical
            assert torch.equal(value, trained[name]), name
    changed = [r["block"] for r in reports if not r["kept_refit"]]
    for i in changed:
        assert not torch.equal(block_mlp(decoder_blocks(model)[i]).down_proj.weight,
                               block_mlp(decoder_blocks(refit)[i]).down_proj.weight)  # fmt: skip
    assert result.options["compensation"] == "reconstruct"


def test_reconstructed_models_save_reload_and_record_the_losses(calib, tokenizer, tmp_path):
    model = make_tiny_model("qwen3")
    result = cfsp.prune(model, calib, 0.5, **RECONSTRUCT)
    cfsp.save_pruned(model, tokenizer, result, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "pruning_plan.json").read_text())
    assert [r["loss_after"] for r in plan["reconstruction"]] == [
        r["loss_after"] for r in result.reconstruction
    ]
    reloaded, _ = cfsp.load_pruned(tmp_path / "m", device="cpu")
    assert torch.equal(_logits(reloaded, calib[:2]), _logits(model, calib[:2]))
    with pytest.raises(CfspError, match="trained the MLPs"):
        cfsp.apply_plan(make_tiny_model("qwen3"), plan)


def test_uniform_reconstruction_keeps_a_stock_checkpoint(calib, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    result = cfsp.prune(model, calib, 0.5, uniform=True, **RECONSTRUCT)
    assert result.reconstruction and all(b is None for b in (result.down_biases or [None]))
    cfsp.save_pruned(model, tokenizer, result, tmp_path / "u")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    assert torch.equal(_logits(stock, calib[:2]), _logits(model, calib[:2]))


def test_the_block_target_falls_back_where_the_block_is_not_residual_plus_mlp(calib):
    model = make_tiny_model("gemma3")  # residual + post_feedforward_layernorm(mlp)
    checks = []

    def check(index, stats):
        block = decoder_blocks(model)[index]
        checks.append(_adds_mlp_output(block, block_mlp(block), block.post_feedforward_layernorm, stats.mlp))
        original = block.forward
        block.forward = lambda *a, **k: 2 * original(*a, **k)  # scales the residual, as Gemma 4's scalar
        checks.append(_adds_mlp_output(block, block_mlp(block), block.post_feedforward_layernorm, stats.mlp))
        del block.forward
        return False

    _with_mlp_records(model, calib[:4], check)
    assert checks == [True, False] * len(decoder_blocks(model))


@pytest.mark.parametrize(
    "bad",
    [
        dict(reconstruct_epochs=0),
        dict(reconstruct_lr=0.0),
        dict(reconstruct_batch_tokens=0),
        dict(reconstruct_holdout=0.9),
        dict(reconstruct_target="logits"),
        dict(reconstruct_inputs="noisy"),
        dict(reconstruct_schedule="linear"),
    ],
)
def test_bad_reconstruction_options_are_one_line_errors(bad):
    with pytest.raises(CfspError) as error:
        cfsp.PruneConfig.from_options(compensation="reconstruct", **bad)
    assert "\n" not in str(error.value)


@pytest.mark.llamacpp
def test_a_reconstructed_model_runs_in_llama_cpp(calib, tmp_path):
    from conftest import assert_llama_cpp_agrees, bpe_tokenizer

    from cfsp.export import export_gguf

    model = make_tiny_model("llama")
    result = cfsp.prune(model, calib, 0.5, **RECONSTRUCT)
    cfsp.save_pruned(model, bpe_tokenizer(), result, tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32", progress=False)
    assert_llama_cpp_agrees(tmp_path / "m.gguf", model, calib[:1])


def test_the_outputs_passed_on_equal_a_rerun_of_the_reconstructed_block(family, calib, monkeypatch):
    """Error-correcting reconstruction hands the next block residual + post(mlp(x)) instead of
    running the block again; that must be the block's real output."""
    import cfsp.apply
    from cfsp.calibration import run_block
    from cfsp.reconstruction import block_outputs_after

    errors = []

    def checked(block, record):
        fast = block_outputs_after(block, record)
        hidden, call = record.first_call
        slow = run_block(block, hidden, call)
        errors.append(float((fast[0] - slow).abs().max() / slow.abs().max()))
        return fast

    monkeypatch.setattr(cfsp.apply, "block_outputs_after", checked)
    cfsp.prune(make_tiny_model(family), calib, 0.5, reconstruct_inputs="pruned", reconstruct_target="block",
               reconstruct_holdout=0.0, **RECONSTRUCT)  # fmt: skip
    assert errors and max(errors) < 1e-5
