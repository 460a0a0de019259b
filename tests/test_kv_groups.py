"""Removing whole KV groups (a KV head and the query heads that read it) from the attention
sublayers: the exactness of the cut, the choice of groups, the o_proj refit, and every output path
(reload, stock load, streaming, cached generation, apply_plan, GGUF, vLLM)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    FAMILIES,
    assert_llama_cpp_agrees,
    bpe_tokenizer,
    cli_prune_args,
    make_byte_tokenizer,
    make_tiny_model,
    recover_briefly,
)
from real_models import DEFAULT_CONFIGS, REAL_CONFIGS, make_real_model
from test_attention import (
    assert_cached_generation_agrees,
    assert_stock_transformers_agrees,
    saved_source,
    windows,
)

import cfsp
from cfsp import layouts
from cfsp.compensation import refit_out_projection
from cfsp.errors import CfspError
from cfsp.statistics import BlockStats
from cfsp.streaming import prune_directory


def _zero_removed_heads(model: torch.nn.Module, kept_groups: list) -> None:
    """The dense model with the removed groups' o_proj columns zeroed: what the cut must equal."""
    for block, kept in zip(model.model.layers, kept_groups, strict=True):
        attention = block.self_attn
        shape = layouts.head_shape(attention)
        removed = torch.tensor([g for g in range(shape.kv_heads) if g not in kept.tolist()])
        with torch.no_grad():
            attention.o_proj.weight[:, layouts.group_rows(shape, removed, query=True)] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_sublayer_equals_the_dense_one_without_the_removed_heads(family):
    calib = windows()
    model = make_tiny_model(family)
    reference = copy.deepcopy(model)
    result = cfsp.prune(model, calib, 0.5, multiple=32, kv_groups=1, compensation="none", progress=False)
    assert all(g.numel() == 1 for g in result.kept_kv_groups)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (
        2,
        1,
        16,
    )
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (
        32,
        16,
        32,
    )
    _zero_removed_heads(reference, result.kept_kv_groups)
    plan = result.to_plan() | {"architecture": type(model).__name__}
    plan.pop("kept_kv_groups")
    cfsp.apply_plan(reference, plan)  # the same MLP cut, every head kept
    with torch.no_grad():
        torch.testing.assert_close(model(calib[:2]).logits, reference(calib[:2]).logits, rtol=1e-4, atol=1e-5)


def test_the_group_that_adds_nothing_is_the_one_removed():
    model = make_tiny_model("llama")
    for index, block in enumerate(model.model.layers):
        silent = torch.tensor([index % 2])  # group 0 or 1 adds nothing to the output
        shape = layouts.head_shape(block.self_attn)
        with torch.no_grad():
            block.self_attn.o_proj.weight[:, layouts.group_rows(shape, silent, query=True)] = 0
    result = cfsp.prune(model, windows(), 0.5, multiple=32, kv_groups=1, progress=False)
    assert [g.tolist() for g in result.kept_kv_groups] == [[1], [0], [1], [0]]


def test_the_refit_metric_sees_that_a_duplicate_group_can_take_over():
    """Group 1 computes exactly what group 0 computes: removing either loses nothing once o_proj is
    refit, which the refit error says and the output energy does not."""
    from cfsp.scoring import kv_group_scores
    from cfsp.statistics import calibrate

    model = make_tiny_model("llama")
    attention = model.model.layers[0].self_attn
    shape = layouts.head_shape(attention)
    with torch.no_grad():
        for name, query in (("q_proj", True), ("k_proj", False), ("v_proj", False)):
            rows = [layouts.group_rows(shape, torch.tensor([g]), query) for g in (0, 1)]
            getattr(attention, name).weight[rows[1]] = getattr(attention, name).weight[rows[0]]
    heads = calibrate(model, windows(32), progress=False, heads=True)[0].heads
    width = shape.group_size * shape.head_dim
    refit = kv_group_scores("refit", attention.o_proj.weight, heads, width, 1e-8)
    energy = kv_group_scores("energy", attention.o_proj.weight, heads, width, 1e-8)
    assert refit.max() < 1e-4 * energy.min()


def test_the_o_proj_refit_beats_plain_slicing_on_the_calibration_tokens():
    torch.manual_seed(0)
    x = torch.randn(4, 256, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)  # correlated
    weight = torch.randn(24, 32, dtype=torch.float64)
    heads = BlockStats()
    heads.add_tokens(x, second_moments=True)
    kept = torch.arange(16)
    refit = refit_out_projection(weight, kept, heads, damping=1e-6)
    flat = x.flatten(0, 1)
    target = flat @ weight.T
    plain_error = (flat[:, kept] @ weight[:, kept].T - target).pow(2).mean()
    refit_error = (flat[:, kept] @ refit.T - target).pow(2).mean()
    assert refit_error < 0.5 * plain_error
    few = BlockStats()
    few.add_tokens(x[:1, :32], second_moments=True)  # 32 tokens for 16 columns: too few, the columns stay
    assert refit_out_projection(weight, kept, few, damping=1e-6) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_reloads_streams_and_generates_with_fewer_kv_heads(family, tmp_path):
    source, model = saved_source(family, tmp_path / "source")
    calib = windows(32)
    options = dict(multiple=32, kv_groups=1, drop_attention=1, progress=False)
    result = cfsp.prune(model, calib, 0.5, **options)
    cfsp.save_pruned(model, make_byte_tokenizer(), result, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    plan = cfsp.read_plan(tmp_path / "pruned")
    dropped = result.dropped_attention[0]
    assert plan["kept_kv_groups"][dropped] is None and len(plan["kept_kv_groups"][dropped - 1]) == 1
    with torch.no_grad():
        expected = model(calib[:2]).logits
        reloaded, _ = cfsp.load_pruned(tmp_path / "pruned", device="cpu")
        assert torch.equal(reloaded(calib[:2]).logits, expected)
        streamed = prune_directory(source, calib, 0.5, tmp_path / "streamed", device="cpu", **options)
        assert [g if g is None else g.tolist() for g in streamed.kept_kv_groups] == plan["kept_kv_groups"]
        again, _ = cfsp.load_pruned(tmp_path / "streamed", device="cpu")
        torch.testing.assert_close(again(calib[:2]).logits, expected, rtol=1e-5, atol=1e-5)
    assert_cached_generation_agrees(model, calib[:1, :10], 8)


def test_apply_plan_replays_the_kv_groups():
    calib = windows()
    model = make_tiny_model("qwen2")  # q/k/v biases
    result = cfsp.prune(model, calib, 0.5, multiple=32, kv_groups=1, compensation="mean", progress=False)
    fresh = cfsp.apply_plan(make_tiny_model("qwen2"), result.to_plan() | {"architecture": "Qwen2ForCausalLM"})
    assert fresh.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.equal(fresh(calib[:2]).logits, model(calib[:2]).logits)


def test_budget_mode_counts_the_removed_groups():
    calib = windows(32)
    ffn_sparsity = []
    for kv_groups in (0, 1):
        model = make_tiny_model("llama")
        options = dict(multiple=1, total_sparsity=0.3, kv_groups=kv_groups, compensation="none")
        result = cfsp.prune(model, calib, progress=False, **options)
        removed = 1 - result.params_after / result.params_before
        assert removed == pytest.approx(0.3, abs=0.002)  # no compensation bias to count
        ffn_sparsity.append(result.target_sparsity)
    assert ffn_sparsity[1] < ffn_sparsity[0] - 0.05  # the removed heads leave more FFN channels


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kv_groups=2), "must keep one"),
        (dict(kv_groups=-1), "whole count"),
        (dict(kv_groups=True), "whole count"),
        (dict(kv_groups=1, compensation="reconstruct"), "reconstruct"),
    ],
)
def test_impossible_kv_group_requests_fail_before_any_work(options, message):
    model = make_tiny_model("llama")
    with pytest.raises(CfspError, match=message):
        cfsp.prune(model, windows(), 0.5, multiple=32, progress=False, **options)
    assert model.model.layers[0].self_attn.k_proj.out_features == 32


REAL_FAMILIES = REAL_CONFIGS + DEFAULT_CONFIGS


@pytest.mark.families
def test_every_family_cuts_kv_groups_or_refuses_in_one_line(tmp_path):
    """Each published config (shrunk): one KV group removed, saved, and loaded by stock transformers
    with trust_remote_code in a process where cfsp cannot be imported; or a one-line refusal where
    groups cannot be cut (one KV head, fused or jointly normalised projections, shared KV caches)."""
    calib = windows(32)
    pruned, refused = {}, {}
    for name in REAL_FAMILIES:
        model = make_real_model(name, heads=8)  # with the published ratio of query to KV heads
        try:
            result = cfsp.prune(model, calib, 0.5, multiple=32, kv_groups=1, progress=False)
        except CfspError as exc:
            refused[name] = str(exc)
            assert "\n" not in str(exc) and "--kv-groups" in str(exc)
            continue
        kept = next(g for g in result.kept_kv_groups if g is not None)
        assert model.config.num_key_value_heads == kept.numel(), name
        pruned[name] = (model, result)
    assert len(pruned) >= 10, refused  # the others have one KV head, or no separable groups
    assert_stock_transformers_agrees(tmp_path, calib[:2, :40], pruned)


def test_a_uniform_output_with_fewer_kv_heads_is_a_stock_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    calib = windows(32)
    model = make_tiny_model("llama")
    result = cfsp.prune(model, calib, 0.5, multiple=32, kv_groups=1, uniform=True, progress=False)
    cfsp.save_pruned(model, make_byte_tokenizer(), result, tmp_path / "u")
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert "auto_map" not in config and config["num_key_value_heads"] == 1
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    with torch.no_grad():
        assert torch.equal(stock(calib[:2]).logits, model(calib[:2]).logits)


def _cut_directory(family: str, folder) -> torch.nn.Module:
    model = make_tiny_model(family)
    result = cfsp.prune(model, windows(32), 0.5, multiple=32, kv_groups=1, progress=False)
    cfsp.save_pruned(model, bpe_tokenizer(), result, folder)
    return model


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_deci_runs_fewer_kv_heads_like_transformers(family, tmp_path):
    from gguf import GGUFReader

    from cfsp.export import export_gguf

    model = _cut_directory(family, tmp_path / "p")
    export_gguf(tmp_path / "p", tmp_path / "m.gguf", "f32", progress=False)
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert list(fields["deci.attention.head_count"].contents()) == [2] * 4
    assert list(fields["deci.attention.head_count_kv"].contents()) == [1] * 4
    assert fields["deci.attention.key_length"].contents() == 16
    assert_llama_cpp_agrees(tmp_path / "m.gguf", model, windows(1, 48, seed=1))


@pytest.mark.llamacpp
def test_a_uniform_qwen3_with_fewer_kv_heads_goes_through_llama_cpps_converter(tmp_path):
    from gguf import GGUFReader
    from test_export import qwen3_with_smollm2_vocabulary

    from cfsp.evaluation import wikitext_ids
    from cfsp.export import export_gguf

    model, tokenizer = qwen3_with_smollm2_vocabulary()
    calib = torch.randint(100, len(tokenizer), (32, 64), generator=torch.Generator().manual_seed(0))
    result = cfsp.prune(model, calib, 0.5, multiple=32, uniform=True, kv_groups=1, progress=False)
    cfsp.save_pruned(model, tokenizer, result, tmp_path / "uniform")
    export_gguf(tmp_path / "uniform", tmp_path / "q.gguf", "f32", progress=False)
    fields = GGUFReader(tmp_path / "q.gguf").fields
    assert fields["general.architecture"].contents() == "qwen3"
    assert fields["qwen3.attention.head_count"].contents() == 2
    assert fields["qwen3.attention.head_count_kv"].contents() == 1
    assert_llama_cpp_agrees(tmp_path / "q.gguf", model, wikitext_ids(tokenizer)[:64].reshape(1, 64))


def test_vllm_export_has_the_cut_head_counts(tmp_path):
    from safetensors import safe_open

    from cfsp.export.vllm import export_vllm

    _cut_directory("llama", tmp_path / "p")
    export_vllm(tmp_path / "p", tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    assert {b["attention"]["n_heads_in_group"] for b in config["block_configs"]} == {2}
    with safe_open(tmp_path / "v" / "model.safetensors", framework="pt") as handle:
        assert handle.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [16, 64]
        assert handle.get_slice("model.layers.0.self_attn.o_proj.weight").get_shape() == [64, 32]


@pytest.mark.cli
def test_cli_cuts_kv_groups_and_reports_them(tmp_path):
    from typer.testing import CliRunner

    from cfsp.cli import app

    common = cli_prune_args(tmp_path, nsamples=8)
    done = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "cut"), "--kv-groups", "1"])
    assert done.exit_code == 0, done.output
    assert "KV groups" in done.output and "1 kept per attention sublayer" in done.output
    refused = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "no"), "--kv-groups", "2"])
    assert refused.exit_code == 2 and refused.output.count("error:") == 1 and not (tmp_path / "no").exists()


def test_ig_lora_recovery_trains_a_model_with_fewer_kv_heads(tmp_path):
    model = make_tiny_model("llama")
    result = cfsp.prune(model, windows(32), 0.5, multiple=32, kv_groups=1, progress=False)
    done, before, after = recover_briefly(model, result, tmp_path)
    assert done.steps == 8 and after < before - 0.1
    key = done.model.model.layers[0].self_attn.k_proj
    assert getattr(key, "base_layer", key).out_features == 16


def test_kv_groups_refuse_precomputed_statistics_before_any_work():
    from cfsp.statistics import calibrate

    model = make_tiny_model("llama")
    stats = calibrate(model, windows(), progress=False)
    with pytest.raises(CfspError, match="own calibration pass"):
        cfsp.prune(model, windows(), 0.5, multiple=32, kv_groups=1, stats=stats, progress=False)
    assert model.model.layers[0].self_attn.k_proj.out_features == 32
