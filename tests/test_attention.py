"""Dropping attention sublayers: the sublayer importance, the surgery, and every output path
(reload, stock load, streaming, generation with a cache, GGUF deci, vLLM DeciLM)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    FAMILIES,
    VOCAB,
    bpe_tokenizer,
    cli_prune_args,
    make_byte_tokenizer,
    make_tiny_model,
    recover_briefly,
)
from real_models import DEFAULT_CONFIGS, REAL_CONFIGS, make_real_model

import cfsp
from cfsp import layouts
from cfsp.errors import CfspError
from cfsp.scoring import sublayer_importance
from cfsp.statistics import calibrate
from cfsp.streaming import prune_directory

REAL_FAMILIES = REAL_CONFIGS + DEFAULT_CONFIGS


def windows(n: int = 16, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _residual_parts(block: torch.nn.Module, x: torch.Tensor, call) -> tuple[torch.Tensor, ...]:
    """(attention's contribution, MLP's contribution, block output) of one block run."""
    parts = {}
    attention = layouts.post_attention_norm(block) or getattr(block, layouts.ATTENTION)
    mlp = layouts.post_mlp_norm(block) or block.mlp

    def keep(name: str):
        def hook(_module, _args, out) -> None:  # returning None leaves the output as it is
            parts[name] = out[0] if isinstance(out, tuple) else out

        return hook

    hooks = [attention.register_forward_hook(keep("a")), mlp.register_forward_hook(keep("m"))]
    try:
        args, kwargs = call
        out = block(x, *args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return parts["a"], parts["m"], out[0] if isinstance(out, tuple) else out


# Families whose block adds more than its two sublayers to the residual stream.
EXTRA_RESIDUAL_TERMS = {"gemma4_text": "per-layer embeddings and a layer scalar"}
WITH_ATTENTION = [name for name in REAL_FAMILIES if name not in EXTRA_RESIDUAL_TERMS]


@pytest.mark.parametrize("name", WITH_ATTENTION)
def test_attention_and_mlp_contributions_add_up_to_the_block_output(name):
    """The hooks the sublayer importance reads see exactly what each sublayer adds to the stream:
    x + attention + mlp == block(x), in every family (pre-norm, post-norm, parallel)."""
    from cfsp.calibration import capture_block_inputs

    model = make_real_model(name)
    hidden, block_calls = capture_block_inputs(model, windows(2, 24), 2)
    block = model.model.layers[0]
    if not layouts.has_attention(block):
        pytest.skip("first block has linear attention")
    with torch.no_grad():
        x = hidden[0]
        a, m, y = _residual_parts(block, x, block_calls[0][0])
    torch.testing.assert_close(x + a + m, y, rtol=1e-5, atol=1e-5)


def test_sublayer_importance_is_recorded_and_zero_for_a_block_without_attention():
    model = make_tiny_model("llama")
    stats = calibrate(model, windows(), progress=False)
    attention, mlp = sublayer_importance(stats)
    assert all(0.0 < value < 1.0 for value in attention + mlp)
    layouts.drop_attention(model.model.layers[2])
    attention, mlp = sublayer_importance(calibrate(model, windows(), progress=False))
    assert attention[2] == 0.0 and mlp[2] > 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_no_attention_changes_nothing(family):
    calib = windows()
    plain, dropped_none = make_tiny_model(family), make_tiny_model(family)
    a = cfsp.prune(plain, calib, 0.5, multiple=32, progress=False)
    b = cfsp.prune(dropped_none, calib, 0.5, multiple=32, drop_attention=0, progress=False)
    assert b.dropped_attention == [] and all(
        layouts.has_attention(block) for block in dropped_none.model.layers
    )
    assert [k.tolist() for k in a.kept_channels] == [k.tolist() for k in b.kept_channels]
    with torch.no_grad():
        assert torch.equal(plain(calib[:2]).logits, dropped_none(calib[:2]).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_block_without_attention_computes_x_plus_mlp_of_norm_x(family):
    model = make_tiny_model(family)
    result = cfsp.prune(model, windows(), 0.5, multiple=32, drop_attention=1, progress=False)
    assert len(result.dropped_attention) == 1
    index = result.dropped_attention[0]
    block = model.model.layers[index]
    assert isinstance(block.self_attn, layouts.NoAttention) and not list(block.self_attn.parameters())
    # the lowest attention importance was dropped
    assert result.attention_importance[index] == min(result.attention_importance)
    from cfsp.calibration import capture_block_inputs

    hidden, block_calls = capture_block_inputs(model, windows(2, 24), 2)
    x = hidden[0]
    args, kwargs = block_calls[index][0]
    pre_norm = getattr(block, "pre_feedforward_layernorm", None) or block.post_attention_layernorm
    post_norm = layouts.post_mlp_norm(block) or torch.nn.Identity()
    with torch.no_grad():
        out = block(x, *args, **kwargs)
        expected = x + post_norm(block.mlp(pre_norm(x)))
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, expected)


@pytest.mark.parametrize("family, dropped", [("llama", [0, 2]), ("gemma3", [0, 1])])
def test_generation_with_a_cache_equals_generation_without(family, dropped):
    """transformers reads the cache length from block 0 and the global mask's size from the first
    global-attention block (Gemma 3's block 1): both dropped here."""
    model = make_tiny_model(family)
    for index in dropped:
        layouts.drop_attention(model.model.layers[index])
    assert_cached_generation_agrees(model, windows(1, 10), 12)


def assert_cached_generation_agrees(model, prompt: torch.Tensor, tokens: int) -> None:
    """Greedy generation with a KV cache equals greedy generation recomputing every prefix."""
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=tokens, do_sample=False, use_cache=True)
        sequence = prompt
        for _ in range(tokens):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, sequence)


def saved_source(family: str, folder):
    """A tiny model of ``family`` saved with a tokenizer in ``folder``; returns (folder, it loaded)."""
    make_tiny_model(family).save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder, cfsp.load_model(folder, device="cpu")[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_reloads_and_streams_without_the_dropped_attention(family, tmp_path):
    source, model = saved_source(family, tmp_path / "source")
    calib = windows()
    options = dict(multiple=32, drop_attention=2, progress=False)
    result = cfsp.prune(model, calib, 0.5, **options)
    cfsp.save_pruned(model, make_byte_tokenizer(), result, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    skipped = [int(i) for i, v in config["per_layer_config"].items() if "self_attn" in v.get("skip", [])]
    assert sorted(skipped) == result.dropped_attention
    weights = json.loads((tmp_path / "pruned" / "pruning_plan.json").read_text())["dropped_attention"]
    assert weights == result.dropped_attention
    with torch.no_grad():
        expected = model(calib[:2]).logits
        reloaded, _ = cfsp.load_pruned(tmp_path / "pruned", device="cpu")
        assert torch.equal(reloaded(calib[:2]).logits, expected)
        streamed = prune_directory(source, calib, 0.5, tmp_path / "streamed", device="cpu", **options)
        assert streamed.dropped_attention == result.dropped_attention
        assert streamed.params_after == result.params_after
        again, _ = cfsp.load_pruned(tmp_path / "streamed", device="cpu")
        assert torch.equal(again(calib[:2]).logits, expected)


STOCK_LOAD = """
import sys, torch
sys.modules["cfsp"] = None
from transformers import AutoModelForCausalLM
x = torch.load(sys.argv[1])
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        torch.save(model(x).logits, folder + ".stock.pt")
"""


@pytest.mark.families
def test_every_family_drops_attention_and_loads_with_stock_transformers(tmp_path):
    """Each published config (shrunk): an attention sublayer dropped, saved, and loaded by stock
    transformers with trust_remote_code in a process where cfsp cannot be imported."""
    calib = windows()
    pruned = {}
    for name in REAL_FAMILIES:
        model = make_real_model(name)
        if getattr(model.config, "num_kv_shared_layers", 0):
            with pytest.raises(CfspError, match="reuse the KV cache"):
                cfsp.prune(model, calib, 0.5, multiple=32, drop_attention=1, progress=False)
            continue
        if sum(layouts.has_attention(block) for block in model.model.layers) < 2:  # Qwen3.5's other
            with pytest.raises(CfspError, match="keep at"):  # blocks have linear attention
                cfsp.prune(model, calib, 0.5, multiple=32, drop_attention=1, progress=False)
            continue
        result = cfsp.prune(model, calib, 0.5, multiple=32, drop_attention=1, progress=False)
        assert len(result.dropped_attention) == 1, name
        pruned[name] = (model, result)
    assert_stock_transformers_agrees(tmp_path, calib[:2, :40], pruned)


def assert_stock_transformers_agrees(folder, x: torch.Tensor, pruned: dict) -> None:
    """Each pruned model (name -> (model, result)) saved under ``folder`` and loaded by stock
    transformers with trust_remote_code, in a process where cfsp cannot be imported, gives the
    in-memory model's logits on ``x`` exactly."""
    torch.save(x, folder / "x.pt")
    expected = {}
    for name, (model, result) in pruned.items():
        cfsp.save_pruned(model, make_byte_tokenizer(), result, folder / name)
        with torch.no_grad():
            expected[str(folder / name)] = model(x).logits
    done = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(folder / "x.pt"), *expected],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for path, logits in expected.items():
        assert torch.equal(torch.load(path + ".stock.pt"), logits), path


def test_budget_mode_removes_the_share_of_all_parameters():
    calib = windows()
    for drop in (0, 1):
        model = make_tiny_model("llama")
        result = cfsp.prune(model, calib, multiple=1, total_sparsity=0.3, drop_attention=drop, progress=False)
        removed = 1 - result.params_after / result.params_before
        bias = 64 * 4 / result.params_before  # the refit's intercept: one bias per block
        assert removed == pytest.approx(0.3 - bias, abs=0.005)
        assert len(result.dropped_attention) == drop
        assert result.options["total_sparsity"] == 0.3


def test_auto_tries_counts_under_the_budget_and_keeps_the_lowest_heldout_loss():
    from cfsp.search import search_candidates

    assert (
        search_candidates(30) == [0, 1, 2, 4]
        and search_candidates(4) == [0, 1]
        and search_candidates(2) == [0, 1]
    )
    model = make_tiny_model("llama")
    result = cfsp.prune(
        model, windows(), multiple=32, total_sparsity=0.3, drop_attention="auto", progress=False
    )
    tried = result.attention_search
    assert [t["drop_attention"] for t in tried] == [0, 1]
    best = min(tried, key=lambda t: (t["heldout_loss"], t["drop_attention"]))
    assert len(result.dropped_attention) == best["drop_attention"] == result.config.attention.drop_attention
    assert all(t["heldout_loss"] > 0 for t in tried)


def test_apply_plan_replays_the_dropped_attention(tmp_path):
    calib = windows()
    model = make_tiny_model("llama")
    result = cfsp.prune(model, calib, 0.5, multiple=32, drop_attention=1, compensation="mean", progress=False)
    fresh = cfsp.apply_plan(make_tiny_model("llama"), result.to_plan() | {"architecture": "LlamaForCausalLM"})
    assert isinstance(fresh.model.layers[result.dropped_attention[0]].self_attn, layouts.NoAttention)
    with torch.no_grad():
        assert torch.equal(fresh(calib[:2]).logits, model(calib[:2]).logits)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(drop_attention=4), "keep at"),
        (dict(drop_attention=1.5), "whole count"),
        (dict(drop_attention="most"), "or auto"),
        (dict(drop_attention="auto"), "--total-sparsity"),
        (dict(drop_attention=1, uniform=True), "--uniform"),
        (dict(drop_attention=1, compensation="reconstruct"), "reconstruct"),
        (dict(total_sparsity=1.2), "total_sparsity must be in"),
        (dict(total_sparsity=0.01, drop_attention=3), "drop fewer"),
    ],
)
def test_impossible_requests_fail_before_any_work(options, message):
    model = make_tiny_model("llama")
    with pytest.raises(CfspError, match=message):
        cfsp.prune(model, windows(), 0.5, multiple=32, progress=False, **options)
    assert all(layouts.has_attention(block) for block in model.model.layers)


@pytest.mark.cli
def test_cli_refuses_a_bad_drop_count_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from cfsp.cli import app

    source = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    for flags, message in (
        (["--drop-attention", "2.5"], "drop_attention"),
        (["--drop-attention", "auto", "--total-sparsity", "0.2"], "--no-stream"),
    ):
        done = CliRunner().invoke(app, ["prune", "--model", str(source), "--out", str(out), *flags])
        assert done.exit_code == 2 and done.output.count("error:") == 1 and message in done.output
        assert not out.exists()


@pytest.mark.cli
def test_cli_prints_the_sublayer_columns_only_when_attention_is_dropped(tmp_path):
    from typer.testing import CliRunner

    from cfsp.cli import app

    common = cli_prune_args(tmp_path)
    plain = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "plain")])
    dropped = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "dropped"), "--drop-attention", "1"])
    assert plain.exit_code == 0 and dropped.exit_code == 0, plain.output + dropped.output
    assert "attention" not in plain.output and "mlp" not in plain.output
    assert "dropped" in dropped.output and "attention dropped" in dropped.output
    assert len(cfsp.read_plan(tmp_path / "dropped")["dropped_attention"]) == 1


# --------------------------------------------------------------------------- engines


def _dropped_directory(family: str, folder, drop=(1, 2)):
    model = make_tiny_model(family)
    calib = windows()
    result = cfsp.prune(model, calib, 0.5, multiple=32, progress=False)
    for index in drop:  # chosen blocks, so that block 0 (which vLLM needs) keeps its attention
        layouts.drop_attention(model.model.layers[index])
    layouts.set_dropped_attention(model.config, list(drop))
    result.dropped_attention = list(drop)
    cfsp.save_pruned(model, bpe_tokenizer(), result, folder)
    return model


def test_gguf_layout_has_no_heads_and_no_attention_tensors_in_dropped_blocks(tmp_path):
    from gguf import GGUFReader

    from cfsp.export import export_gguf

    _dropped_directory("llama", tmp_path / "p")
    export_gguf(tmp_path / "p", tmp_path / "m.gguf", "f32", progress=False)
    reader = GGUFReader(tmp_path / "m.gguf")
    assert list(reader.fields["deci.attention.head_count"].contents()) == [4, 0, 0, 4]
    assert list(reader.fields["deci.attention.head_count_kv"].contents()) == [2, 0, 0, 2]
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight" in names and not any(
        n.startswith(("blk.1.attn", "blk.2.attn")) for n in names
    )


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_cpp_runs_blocks_without_attention_like_transformers(family, tmp_path):
    from cfsp.export import export_gguf
    from cfsp.llamacpp import token_logits

    model = _dropped_directory(family, tmp_path / "p")
    export_gguf(tmp_path / "p", tmp_path / "m.gguf", "f32", progress=False)
    ids = windows(2, 48, seed=1)
    with torch.no_grad():
        reference = model(ids).logits
    logits = token_logits(tmp_path / "m.gguf", ids)
    assert (logits - reference).abs().max() < 1e-3 * reference.abs().max()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.98


def test_vllm_export_marks_dropped_attention_as_no_op_without_its_norm(tmp_path):
    from safetensors import safe_open

    from cfsp.export.vllm import export_vllm

    _dropped_directory("llama", tmp_path / "p")
    export_vllm(tmp_path / "p", tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, True, True, False]
    with safe_open(tmp_path / "v" / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.input_layernorm.weight" in keys
    assert not {f"model.layers.{i}.input_layernorm.weight" for i in (1, 2)} & keys
    assert not any(k.startswith(("model.layers.1.self_attn", "model.layers.2.self_attn")) for k in keys)


def test_vllm_export_refuses_a_first_block_without_attention(tmp_path):
    from cfsp.export.vllm import export_vllm

    _dropped_directory("llama", tmp_path / "p", drop=(0,))
    with pytest.raises(CfspError, match="first block"):
        export_vllm(tmp_path / "p", tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_ig_lora_recovery_trains_a_model_with_blocks_without_attention(tmp_path):
    model = make_tiny_model("llama")
    result = cfsp.prune(model, windows(), 0.5, multiple=32, drop_attention=1, progress=False)
    done, before, after = recover_briefly(model, result, tmp_path)
    assert done.steps == 8 and after < before - 0.1
    blocks = done.model.model.layers
    assert isinstance(blocks[result.dropped_attention[0]].self_attn, layouts.NoAttention)


def test_benchmark_decoding_on_the_cache_matches_generate_with_blocks_without_attention():
    from cfsp.speed import greedy_decode

    model = make_tiny_model("gemma3")
    for index in (0, 1):
        layouts.drop_attention(model.model.layers[index])
    prompt = windows(2, 10)
    ids, _, _ = greedy_decode(model, prompt, 7)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[:, 10:]
    assert torch.equal(ids, expected)
