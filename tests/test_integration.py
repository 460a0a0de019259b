"""End to end on the real SmolLM2-135M (LLaMA architecture, 30 blocks, D=1536), small calibration set."""

import copy

import pytest
import reference_impl
import torch

import cfsp
from cfsp.evaluation import perplexity
from cfsp.statistics import calibrate

pytestmark = pytest.mark.integration
N, LENGTH = 8, 256


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tokenizer = cfsp.load_model("smollm2")
    except cfsp.CfspError as exc:  # the model package is installed by `make test`
        pytest.skip(str(exc))
    calib = cfsp.calibration_windows(tokenizer, n=N, length=LENGTH, seed=0)
    return (
        model,
        tokenizer,
        calib,
        calibrate(model, calib, progress=False, second_moments=True),  # the default refit needs them
        reference_impl.collect(model, calib),
    )


def _same(ours, theirs) -> list[int]:
    """Blocks whose kept channels differ."""
    return [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a.tolist() != b.tolist()]


def test_cfsp_matches_reference_saves_reloads_and_keeps_quality(smollm2, tmp_path):
    dense, tokenizer, calib, stats, ref_stats = smollm2
    ref_keep, ref_widths, ref_kept = reference_impl.cfsp(dense, ref_stats, 0.5, multiple=128)
    model = copy.deepcopy(dense)
    result = cfsp.prune(
        model,
        calib,
        0.5,
        temperature=N * LENGTH / 1e4,
        channel_metric="cfsp_paper",
        compensation="none",
        rounding="nearest",
        stats=stats,
        progress=False,
    )
    assert result.keep_fractions == pytest.approx(ref_keep, abs=1e-9)
    assert result.widths == ref_widths
    assert _same(result.kept_channels, ref_kept) == []

    assert len(result.widths) == 30 and all(w % 128 == 0 for w in result.widths)
    assert abs(result.realised_sparsity - 0.5) < 0.05
    assert result.params_after < 0.75 * result.params_before

    assert not model.is_quantized  # de-quantized GGUF weights save and train like any model
    out = cfsp.save_pruned(model, tokenizer, result, tmp_path / "smollm2-50")
    reloaded, _ = cfsp.load_pruned(out)
    x = calib[:2, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)

    dense_ppl = perplexity(dense, tokenizer, seqlen=256, limit=4)["ppl"]
    pruned_ppl = perplexity(reloaded, tokenizer, seqlen=256, limit=4)["ppl"]
    assert torch.isfinite(torch.tensor(pruned_ppl))
    assert dense_ppl < pruned_ppl


@pytest.mark.parametrize("method", ["wanda-sp", "flap", "magnitude-sp"])
def test_baselines_match_reference_and_reload(smollm2, tmp_path, method):
    dense, tokenizer, calib, stats, ref_stats = smollm2
    expected = {
        "wanda-sp": lambda: reference_impl.wanda_sp(dense, ref_stats, 0.5),
        "flap": lambda: reference_impl.flap(dense, ref_stats, 0.5)[0],
        "magnitude-sp": lambda: reference_impl.magnitude_sp(dense, 0.5),
    }[method]()
    model = copy.deepcopy(dense)
    result = cfsp.prune(model, calib, 0.5, method=method, reference=True, stats=stats, progress=False)
    assert _same(result.kept_channels, expected) == []
    assert abs(result.realised_sparsity - 0.5) < 0.01

    out = cfsp.save_pruned(model, tokenizer, result, tmp_path / method)
    reloaded, _ = cfsp.load_pruned(out)
    x = calib[:2, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_recovery_runs_on_pruned_smollm2(smollm2, tmp_path):
    from cfsp.recovery import RecoveryConfig, recover

    dense, tokenizer, calib, stats, _ = smollm2
    model = copy.deepcopy(dense)
    result = cfsp.prune(model, calib, 0.5, stats=stats, progress=False)
    config = RecoveryConfig(
        rank=2, steps=2, batch_size=1, grad_accum=1, seqlen=256, max_samples=8, save_steps=2
    )
    recovered = recover(
        model, tokenizer, "dolly_hhrlhf_small", result.block_importance, config, tmp_path / "ckpt"
    )
    assert recovered.steps == 2 and abs(recovered.trainable_params / recovered.uniform_params - 1) <= 0.02
    assert [layer.mlp.down_proj.in_features for layer in recovered.model.model.layers] == result.widths


def test_streaming_smollm2_from_safetensors_equals_in_memory(smollm2, tmp_path):
    """SmolLM2 written once as a safetensors directory, pruned block by block: same model as in memory."""
    from cfsp.streaming import prune_directory

    dense, tokenizer, calib, stats, _ = smollm2
    source = tmp_path / "smollm2-safetensors"
    dense.save_pretrained(source)
    tokenizer.save_pretrained(source)
    model = copy.deepcopy(dense)
    expected = cfsp.prune(model, calib, 0.5, stats=stats, progress=False)
    result = prune_directory(source, calib, 0.5, tmp_path / "streamed", device="cpu", progress=False)
    assert result.widths == expected.widths
    assert _same(result.kept_channels, expected.kept_channels) == []
    reloaded, _ = cfsp.load_pruned(tmp_path / "streamed", device="cpu")
    x = calib[:2, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_pruned_smollm2_runs_in_llama_cpp_like_in_transformers(smollm2, tmp_path):
    """The default prune (refit bias included), exported as f16: llama.cpp predicts what transformers does."""
    from gguf import GGUFReader

    from cfsp.evaluation import wikitext_ids, window_nll
    from cfsp.export import export_gguf
    from cfsp.llamacpp import perplexity as llama_cpp_perplexity
    from cfsp.llamacpp import token_logits

    dense, tokenizer, calib, stats, _ = smollm2
    model = copy.deepcopy(dense)
    result = cfsp.prune(model, calib, 0.5, stats=stats, progress=False)
    cfsp.save_pruned(model, tokenizer, result, tmp_path / "pruned")
    export_gguf(tmp_path / "pruned", tmp_path / "pruned.gguf", "f16", progress=False)
    fields = GGUFReader(tmp_path / "pruned.gguf").fields
    assert fields["deci.feed_forward_length"].contents() == result.widths
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # copied from the source GGUF

    windows = wikitext_ids(tokenizer)[: 2 * 256].reshape(2, 256)
    with torch.no_grad():
        reference = model(windows[:1, :64]).logits[0]
    logits = token_logits(tmp_path / "pruned.gguf", windows[:1, :64])[0]
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.98
    total, count = window_nll(model, windows)
    ours = llama_cpp_perplexity(tmp_path / "pruned.gguf", windows)
    assert ours == pytest.approx(float(torch.exp(torch.tensor(total / count))), rel=0.01)


def test_command_line_prunes_the_named_default_in_memory(tmp_path):
    """``cfsp prune --model smollm2``: a named default (a GGUF) loads whole, is pruned in memory
    and saved; the plan names the package model as its source."""
    from typer.testing import CliRunner

    from cfsp.cli import app

    out = tmp_path / "smollm2-50"
    args = ["prune", "--model", "smollm2", "--nsamples", "8", "--seqlen", "128", "--out", str(out)]
    done = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "loading" in done.output and "streaming" not in done.output
    plan = cfsp.read_plan(out)
    assert plan["source_model"] == "smollm2" and plan["options"]["compensation"] == "mean"  # too few tokens
    assert abs(plan["realised_sparsity"] - 0.5) < 0.02
    model, _ = cfsp.load_pruned(out, device="cpu")
    assert cfsp.models.ffn_widths(model) == plan["widths"]


@pytest.mark.llamacpp
def test_uniform_gemma3_runs_in_llama_cpp_through_its_own_converter(tmp_path):
    """The real Gemma-3-270M pruned with --uniform (streamed from safetensors), exported by llama.cpp's
    own converter: llama.cpp predicts the same next tokens on 64 WikiText-2 positions and gives the
    transformers perplexity within 1 %."""
    from conftest import assert_llama_cpp_agrees
    from gguf import GGUFReader

    from cfsp.evaluation import wikitext_ids
    from cfsp.export import export_gguf
    from cfsp.streaming import prune_directory

    try:
        dense, tokenizer = cfsp.load_model("gemma3-270m", device="cpu")
    except cfsp.CfspError as exc:
        pytest.skip(str(exc))
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    del dense
    calib = cfsp.calibration_windows(tokenizer, n=8, length=128, seed=0)  # a serving check: few tokens
    result = prune_directory(tmp_path / "dense", calib, 0.5, tmp_path / "uniform", device="cpu", uniform=True,
                             progress=False)  # fmt: skip
    assert set(result.widths) == {1024}
    export_gguf(tmp_path / "uniform", tmp_path / "u.gguf", "f16", progress=False)
    assert GGUFReader(tmp_path / "u.gguf").fields["general.architecture"].contents() == "gemma3"
    model, _ = cfsp.load_pruned(tmp_path / "uniform", device="cpu")
    assert_llama_cpp_agrees(tmp_path / "u.gguf", model, wikitext_ids(tokenizer)[:64].reshape(1, 64))
