"""Mixture-of-experts models: removing routed experts, family by family, from tiny models built from
each family's published config (or its config class's defaults) shrunk only in sizes.

The exactness check is the MoE analogue of "every kept channel stays exact": the pruned model's
logits equal the dense model's with the removed experts masked out of routing (their router logits
set to -inf, and for bias-corrected sigmoid routers their correction bias too).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from real_models import MOE_CONFIGS, MOE_DEFAULT_CONFIGS, make_moe_model
from transformers import AutoModelForCausalLM

import cfsp
from cfsp.calibration import run_blocks
from cfsp.errors import CfspError
from cfsp.experts import choose_experts, find_moe, moe_blocks
from cfsp.models import active_parameters, count_parameters, decoder_blocks
from cfsp.plan import Plan
from cfsp.statistics import BlockStats, ExpertRouting

pytestmark = pytest.mark.families
VOCAB = 512


FAMILIES = MOE_CONFIGS + MOE_DEFAULT_CONFIGS
build = make_moe_model


def router_logit_weight(moe) -> torch.Tensor:
    return next(p for p in moe.router.parameters() if p.dim() == 2 and p.shape[0] == moe.count)


@contextmanager
def masked_routing(model: torch.nn.Module, removed: dict[int, torch.Tensor]):
    """The dense model with experts ``removed[block]`` never chosen: -inf router logits (every
    family computes them with F.linear), and -inf correction biases where the router has them."""
    masks, saved = {}, []
    for index, moe in enumerate(moe_blocks(decoder_blocks(model))):
        if moe is None or index not in removed:
            continue
        masks[router_logit_weight(moe).data_ptr()] = removed[index]
        for name, tensor in [*moe.router.named_parameters(), *moe.router.named_buffers()]:
            if "correction_bias" in name:
                saved.append((tensor, tensor.detach().clone()))
                with torch.no_grad():
                    tensor.view(-1)[removed[index]] = -float("inf")
    linear = F.linear

    def masked(input, weight, bias=None):
        out = linear(input, weight, bias)
        columns = masks.get(weight.data_ptr())
        if columns is not None:
            out = out.clone()
            out[..., columns.to(out.device)] = -float("inf")
        return out

    F.linear = masked
    try:
        yield
    finally:
        F.linear = linear
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


def assert_equals_masked(
    dense: torch.nn.Module, model: torch.nn.Module, plan: Plan, x: torch.Tensor
) -> torch.Tensor:
    """The pruned model's logits equal the dense model's with the removed experts masked out of
    routing; returns them."""
    with torch.no_grad(), masked_routing(dense, removed_experts(plan)):
        want = dense(x).logits
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return got


def removed_experts(plan: Plan) -> dict[int, torch.Tensor]:
    out = {}
    for index, (kept, count) in enumerate(zip(plan.kept_experts, plan.original_experts, strict=True)):
        if kept is not None:
            mask = torch.ones(count, dtype=torch.bool)
            mask[kept] = False
            out[index] = mask.nonzero().flatten()
    return out


@pytest.fixture
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_model_equals_masked_routing(name, windows, tmp_path):
    """Every family: the kept experts are exactly the dense model's, routed as before; the saved
    directory is the stock class with the new count, loads with plain from_pretrained, and gives
    the same logits."""
    dense = build(name)
    model = build(name)
    plan = cfsp.prune(model, windows, expert_sparsity=0.5, progress=False)
    x = windows[:2, :16]
    got = assert_equals_masked(dense, model, plan, x)
    moes = moe_blocks(decoder_blocks(model))
    for moe, kept, count in zip(moes, plan.kept_experts, plan.original_experts, strict=True):
        assert (moe is None) == (kept is None)
        if moe is not None:
            assert moe.count == kept.numel() == count // 2
    assert plan.params_after < plan.params_before and plan.active_params_after <= plan.active_params_before
    cfsp.save_pruned(model, None, plan, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "out" / "modeling_cfsp.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    fresh = AutoModelForCausalLM.from_config(stock.config)
    assert {k: v.shape for k, v in stock.state_dict().items()} == {
        k: v.shape for k, v in fresh.state_dict().items()
    }
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, got, rtol=1e-5, atol=1e-5)
    loaded, _ = cfsp.load_model(tmp_path / "out", device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, got, rtol=1e-5, atol=1e-5)


def reap_reference(model: torch.nn.Module, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """REAP as published, written independently: for every expert, the routing weight the model
    gives it times the L2 norm of its own output, averaged over the tokens routed to it (0 if
    none); computed from the router's and each expert's forward, one expert at a time."""
    scores, inputs = {}, {}
    moes = moe_blocks(decoder_blocks(model))

    def keep_inputs(index):
        def hook(_module, args, kwargs, _out):
            inputs.setdefault(index, []).append([*args, *kwargs.values()][:3])

        return hook

    handles = [
        moe.experts.register_forward_hook(keep_inputs(i), with_kwargs=True)
        for i, moe in enumerate(moes)
        if moe is not None
    ]
    with torch.no_grad():
        model(windows)
    for handle in handles:
        handle.remove()
    for index, calls in inputs.items():
        moe = moes[index]
        total = torch.zeros(moe.count, dtype=torch.float64)
        count = torch.zeros(moe.count, dtype=torch.float64)
        for hidden, top_index, top_weight in calls:
            hidden = hidden.reshape(-1, hidden.shape[-1])
            for expert in range(moe.count):
                token, slot = (top_index.reshape(hidden.shape[0], -1) == expert).nonzero(as_tuple=True)
                if token.numel() == 0:
                    continue
                with torch.no_grad():
                    out = moe.experts(
                        hidden[token], torch.full_like(token, expert)[:, None], torch.ones(token.numel(), 1)
                    )
                weight = top_weight.reshape(hidden.shape[0], -1)[token, slot].double()
                total[expert] += (weight * out.double().norm(dim=-1)).sum()
                count[expert] += token.numel()
        scores[index] = total / count.clamp_min(1)
    return scores


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3"])  # a softmax and a sigmoid, grouped router
def test_reap_scores_match_a_reference(name, windows):
    model = build(name)
    want = reap_reference(model, windows)
    records = [BlockStats() for _ in decoder_blocks(model)]
    run_blocks(model, windows, [ExpertRouting(records)], batch_size=2, progress=False)
    plan = cfsp.prune(build(name), windows, expert_sparsity=0.5, progress=False)
    for index, scores in want.items():
        got = records[index].experts
        torch.testing.assert_close(got.saliency_sum / got.routed.clamp_min(1), scores, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(torch.tensor(plan.expert_scores[index], dtype=torch.float64), scores)
        moe = moe_blocks(decoder_blocks(model))[index]
        assert torch.equal(plan.kept_experts[index], choose_experts(scores, moe.count // 2, moe.groups))


def test_group_limited_routing_keeps_the_same_count_per_group():
    scores = torch.tensor([9.0, 1, 2, 3, 8, 7, 0, 1])  # two groups of four
    assert choose_experts(scores, 4, groups=2).tolist() == [0, 3, 4, 5]
    assert choose_experts(scores, 4, groups=1).tolist() == [0, 3, 4, 5]
    assert choose_experts(torch.tensor([9.0, 8, 7, 6, 0, 1, 2, 3]), 4, groups=2).tolist() == [0, 1, 6, 7]


@pytest.mark.parametrize("metric", ["frequency", "gate_mass", "random"])
def test_every_expert_metric_prunes(metric, windows):
    model = make_moe_model("qwen3-30b-a3b")
    plan = cfsp.prune(model, windows, expert_sparsity=0.25, expert_metric=metric, progress=False)
    assert all(k.numel() == 12 for k in plan.kept_experts)
    assert model.config.num_experts == 12
    assert plan.config.expert_metric == metric


def test_frequency_and_gate_mass_count_the_routing(windows):
    model = make_moe_model("qwen3-30b-a3b")
    find_moe(decoder_blocks(model)[0]).router.norm_topk_prob = True
    records = [BlockStats() for _ in decoder_blocks(model)]
    run_blocks(model, windows, [ExpertRouting(records)], batch_size=3, progress=False)
    stats = records[0].experts
    top_k = model.config.num_experts_per_tok
    assert stats.tokens == windows.numel()
    assert stats.routed.sum().item() == windows.numel() * top_k
    # norm_topk_prob: each token's routing weights sum to one
    torch.testing.assert_close(stats.gate_mass.sum().item(), float(windows.numel()), rtol=1e-6, atol=1e-6)


def test_unrouted_experts_are_counted_and_go_first(windows):
    model = make_moe_model("gpt-oss-20b")  # its router has a logit bias
    moe = find_moe(decoder_blocks(model)[0])
    with torch.no_grad():  # expert 3 is never chosen
        moe.router.bias[3] = -1e4
    plan = cfsp.prune(model, windows, expert_sparsity=0.25, progress=False)
    assert plan.unrouted_experts[0] >= 1
    assert plan.expert_scores[0][3] == 0.0 and 3 not in plan.kept_experts[0].tolist()


def test_active_parameters_count_top_k_experts_only():
    model = make_moe_model("qwen3-30b-a3b")
    moe = find_moe(decoder_blocks(model)[0])
    idle = (moe.count - moe.top_k) * moe.parameters_per_expert * len(decoder_blocks(model))
    assert active_parameters(model) == count_parameters(model) - idle


def test_bad_expert_cuts_are_one_line(windows):
    model = make_moe_model("qwen3-30b-a3b")
    with pytest.raises(CfspError, match="fewer than the 8"):
        cfsp.prune(model, windows, expert_sparsity=0.75, progress=False)
    with pytest.raises(CfspError, match="give --expert-sparsity"):
        cfsp.prune(model, windows, 0.5, progress=False)
    with pytest.raises(CfspError, match="cannot be combined with --sparsity"):
        cfsp.prune(model, windows, 0.5, expert_sparsity=0.25, progress=False)
    with pytest.raises(CfspError, match="expert_sparsity must be in"):
        cfsp.prune(model, windows, expert_sparsity=1.0, progress=False)
    grouped = make_moe_model("deepseek-v3")  # 32 experts in 8 groups
    with pytest.raises(CfspError, match="same number of experts kept in every group"):
        cfsp.prune(grouped, windows, expert_sparsity=0.125, progress=False)


def test_dense_model_refuses_expert_sparsity(windows):
    from conftest import make_tiny_model

    with pytest.raises(CfspError, match="has none"):
        cfsp.prune(make_tiny_model(), windows % 256, expert_sparsity=0.5, progress=False)


def test_plan_round_trips_and_replays(windows, tmp_path):
    model = make_moe_model("qwen2-57b-a14b")
    plan = cfsp.prune(model, windows, expert_sparsity=0.5, progress=False)
    cfsp.save_pruned(model, None, plan, tmp_path / "out")
    again = Plan.load(tmp_path / "out")
    assert [None if k is None else k.tolist() for k in again.kept_experts] == [
        None if k is None else k.tolist() for k in plan.kept_experts
    ]
    assert again.stock_output and again.config.expert_sparsity == 0.5
    replayed = cfsp.apply_plan(make_moe_model("qwen2-57b-a14b"), again)
    x = windows[:1]
    with torch.no_grad():
        torch.testing.assert_close(replayed(x).logits, model(x).logits)


@pytest.mark.cli
def test_cli_prunes_experts_into_a_stock_directory(tmp_path):
    from conftest import cli_prune_args
    from typer.testing import CliRunner

    from cfsp.cli import app

    args = cli_prune_args(tmp_path, model=make_moe_model("qwen3-30b-a3b"))
    runner = CliRunner()
    done = runner.invoke(app, [*args, "--expert-sparsity", "0.5", "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert "16 of 32 kept" in done.output and "active parameters per token" in done.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_local_experts"] == 8 and "auto_map" not in config  # qwen3_moe saves its alias
    plan = cfsp.read_plan(tmp_path / "out")
    assert plan["options"]["expert_sparsity"] == 0.5 and plan["options"]["sparsity"] == 0.0
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "dense-cut")])
    assert refused.exit_code == 2 and "give --expert-sparsity" in refused.output
    assert not (tmp_path / "dense-cut").exists()


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "olmoe", "gpt-oss-20b"])
def test_llama_cpp_runs_the_pruned_moe_like_transformers(name, tmp_path):
    from conftest import assert_llama_cpp_agrees
    from gguf import GGUFReader
    from test_export import smollm2_tokenizer

    from cfsp.evaluation import wikitext_ids
    from cfsp.export import export_gguf

    tokenizer = smollm2_tokenizer()
    model = make_moe_model(name, vocab=len(tokenizer))
    calib = torch.randint(100, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    plan = cfsp.prune(model, calib, expert_sparsity=0.5, progress=False)
    cfsp.save_pruned(model, tokenizer, plan, tmp_path / "out")
    export_gguf(tmp_path / "out", tmp_path / "m.gguf", "f32", progress=False)
    fields = GGUFReader(tmp_path / "m.gguf").fields
    arch = fields["general.architecture"].contents()
    assert fields[f"{arch}.expert_count"].contents() == plan.experts_after // len(
        [k for k in plan.kept_experts if k is not None]
    )
    assert_llama_cpp_agrees(tmp_path / "m.gguf", model, wikitext_ids(tokenizer)[:64].reshape(1, 64))


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_equals_in_memory(name, windows, tmp_path):
    """Block by block from the checkpoint's own form (one tensor per expert on disk for most
    families, stacked in the model): the same experts, the same logits, and the output in the
    checkpoint's form again, which plain transformers loads."""
    from cfsp.streaming import load_whole, prune_directory

    source = tmp_path / "source"
    build(name).save_pretrained(source, max_shard_size="200KB")
    whole = load_whole(source, device="cpu", dtype="float32")
    model = build(name)
    assert {k: v.shape for k, v in whole.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert all(
        torch.equal(a, b)
        for a, b in zip(whole.state_dict().values(), model.state_dict().values(), strict=True)
    )
    plan = cfsp.prune(model, windows, expert_sparsity=0.5, progress=False)
    streamed = prune_directory(
        source,
        windows,
        None,
        tmp_path / "out",
        device="cpu",
        dtype="float32",
        expert_sparsity=0.5,
        progress=False,
    )
    for a, b in zip(plan.kept_experts, streamed.kept_experts, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(plan.kept_expert_channels or [], streamed.kept_expert_channels or [], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    original = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k.split(".experts.")[0] for k in written} == {k.split(".experts.")[0] for k in original}
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    x = windows[:2, :16]
    with torch.no_grad():
        assert torch.equal(stock(x).logits, model(x).logits)


# Families whose stock class sizes its shared experts from the routed experts' width.
SHARED_FROM_EXPERT_WIDTH = {"deepseek-v3", "kimi-k2", "glm-4.5-air", "ernie4_5_moe", "hunyuan_v1_moe"}


def zero_removed_channels(model: torch.nn.Module, plan: Plan) -> None:
    """The dense model with each kept expert's removed channels silenced (their down columns zero)."""
    from cfsp.experts import down_columns

    for index, moe in enumerate(moe_blocks(decoder_blocks(model))):
        channels = plan.kept_expert_channels[index]
        if moe is None or channels is None:
            continue
        kept_experts = plan.kept_experts[index]
        with torch.no_grad():
            columns = down_columns(moe.experts)  # a view: [E, H, I]
            for row, expert in enumerate(kept_experts.tolist()):
                mask = torch.ones(moe.width, dtype=torch.bool)
                mask[channels[row]] = False
                columns[expert][:, mask] = 0


@pytest.mark.parametrize("name", FAMILIES)
def test_channels_inside_experts_equal_silenced_channels(name, windows, tmp_path):
    """Channels removed inside every kept expert (one width for all): the logits equal the dense
    model's with those channels silenced (and the removed experts masked); the directory is still
    the stock class, with the new expert width in its config."""
    dense, model = build(name), build(name)
    width = find_moe(next(b for b in decoder_blocks(model) if find_moe(b) is not None)).width
    if name in SHARED_FROM_EXPERT_WIDTH:  # narrower experts would narrow the stock class's shared experts
        with pytest.raises(CfspError, match="sizes other tensors from the experts' width"):
            cfsp.prune(model, windows, expert_channel_sparsity=0.25, progress=False)
        return
    plan = cfsp.prune(model, windows, expert_sparsity=0.25, expert_channel_sparsity=0.25, progress=False)
    zero_removed_channels(dense, plan)
    x = windows[:2, :16]
    got = assert_equals_masked(dense, model, plan, x)
    for moe in moe_blocks(decoder_blocks(model)):
        if moe is not None:
            assert moe.width == width - round(width * 0.25)
    assert plan.stock_output
    cfsp.save_pruned(model, None, plan, tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3"])
def test_a_parameter_budget_takes_whole_experts(name, windows):
    """--total-sparsity on an MoE model: the nearest count of whole experts per block (whole groups'
    worth under group-limited routing) to the share of all parameters asked for."""
    model = build(name)
    moes = [m for m in moe_blocks(decoder_blocks(model)) if m is not None]
    step = moes[0].parameters_per_expert * len(moes) * moes[0].groups / count_parameters(model)
    plan = cfsp.prune(model, windows, total_sparsity=0.3, progress=False)
    removed = 1 - plan.params_after / plan.params_before
    assert abs(removed - 0.3) <= step / 2 + 1e-9
    assert plan.config.sparsity == 0.0 and plan.config.expert_sparsity > 0
    counts = {k.numel() for k in plan.kept_experts if k is not None}
    assert len(counts) == 1 and (moes[0].count - counts.pop()) % moes[0].groups == 0
    with pytest.raises(CfspError, match="less than one routed expert"):
        cfsp.prune(build(name), windows, total_sparsity=0.001, progress=False)
