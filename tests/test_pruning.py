"""prune() on tiny models of every family: widths, kept channels, methods, reference behaviour."""

import copy

import pytest
import reference_impl
import torch
from conftest import make_tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import cfsp
from cfsp.methods import METHODS
from cfsp.models import ffn_widths
from cfsp.statistics import calibrate

# the reference's channel rule and per-block rounding
REFERENCE_SCORE = dict(channel_metric="cfsp_paper", compensation="none", rounding="nearest")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_prunes_every_family(tiny_model, calib, method):
    x = calib[:2, :16]
    result = cfsp.prune(tiny_model, calib, 0.5, method=method, progress=False)
    assert ffn_widths(tiny_model) == result.widths
    assert [k.numel() for k in result.kept_channels] == result.widths
    assert all(torch.equal(k, k.sort().values) for k in result.kept_channels)
    assert abs(result.realised_sparsity - 0.5) < 0.13
    assert result.params_after < result.params_before
    with torch.no_grad():
        assert torch.isfinite(tiny_model(x).logits).all()


def test_cfsp_widths_are_multiples_and_follow_importance(calib):
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    result = cfsp.prune(model, calib, 0.5, multiple=32, temperature=200.0, progress=False)
    assert all(w % 32 == 0 and 32 <= w <= 256 for w in result.widths)
    order = sorted(range(4), key=lambda i: result.block_importance[i])
    assert [result.keep_fractions[i] for i in order] == sorted(result.keep_fractions)


def test_uniform_allocation_and_global_threshold_totals(calib):
    from conftest import make_tiny_model

    uniform = cfsp.prune(
        make_tiny_model("qwen2"), calib, 0.25, allocation="uniform", multiple=1, progress=False
    )
    assert uniform.widths == [192] * 4
    wanda = cfsp.prune(make_tiny_model("qwen2"), calib, 0.3, method="wanda-sp", progress=False)
    assert abs((1024 - sum(wanda.widths)) - 1024 * 0.3) <= 1


def test_kept_channels_match_the_reference_formulas(family, calib):
    """Same calibration tokens, temperature N*L/1e4: the channels the reference keeps, in every block."""
    from conftest import make_tiny_model

    n, length = calib.shape
    dense = make_tiny_model(family)
    ref_keep, ref_widths, ref_kept = reference_impl.cfsp(
        dense, reference_impl.collect(dense, calib), 0.5, multiple=32
    )
    ours = cfsp.prune(
        make_tiny_model(family),
        calib,
        0.5,
        temperature=n * length / 1e4,
        multiple=32,
        progress=False,
        **REFERENCE_SCORE,
    )
    assert ours.keep_fractions == pytest.approx(ref_keep, abs=1e-9)
    assert ours.widths == ref_widths
    for mine, theirs in zip(ours.kept_channels, ref_kept, strict=True):
        assert mine.tolist() == theirs.tolist()
    exact = cfsp.prune(make_tiny_model(family), calib, 0.5, reference=True, multiple=32, progress=False)
    assert [k.tolist() for k in exact.kept_channels] == [k.tolist() for k in ref_kept]


def test_shared_calibration_gives_the_same_result(calib):
    from conftest import make_tiny_model

    dense = make_tiny_model("mistral")
    stats = calibrate(dense, calib, progress=False, second_moments=True)  # the default refit needs them
    reused = cfsp.prune(copy.deepcopy(dense), None, 0.5, stats=stats, progress=False)
    fresh = cfsp.prune(copy.deepcopy(dense), calib, 0.5, progress=False)
    assert [k.tolist() for k in reused.kept_channels] == [k.tolist() for k in fresh.kept_channels]


def test_flap_bias_compensation_is_exact_for_constant_channels(calib):
    """Channels whose activation is constant over tokens are removed without changing the output."""
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            constant = torch.arange(0, 256, 2)  # half the channels ignore their input
            mlp.gate_proj.weight[constant] = 0
            mlp.up_proj.weight[constant] = 0
            mlp.gate_proj.bias.normal_()
            mlp.up_proj.bias.normal_()
    x = calib[:2]
    with torch.no_grad():
        dense = model(x).logits
    result = cfsp.prune(model, calib, 0.5, method="flap", allocation="uniform", progress=False)
    assert all(torch.equal(k, torch.arange(1, 256, 2)) for k in result.kept_channels)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, dense, atol=1e-4)


def test_magnitude_sp_needs_no_calibration(tiny_model):
    result = cfsp.prune(tiny_model, None, 0.5, method="magnitude-sp", progress=False)
    assert result.widths == [128] * 4 and result.block_importance is None


@pytest.mark.parametrize("sparsity", [0.17, 0.37, 0.5, 0.81])
def test_budget_rounding_removes_the_requested_total_within_half_a_multiple(calib, sparsity):
    from conftest import make_tiny_model

    result = cfsp.prune(make_tiny_model("llama"), calib, sparsity, multiple=32, progress=False)
    total = sum(result.original_widths)
    assert abs(total * (1 - sparsity) - sum(result.widths)) <= 16
    assert all(w % 32 == 0 for w in result.widths) and result.options["rounding"] == "budget"


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.2, 1.5])
def test_sparsity_outside_open_interval_is_refused(tiny_model, calib, sparsity):
    with pytest.raises(cfsp.CfspError, match="sparsity must be in"):
        cfsp.prune(tiny_model, calib, sparsity, progress=False)


def test_bad_options_are_refused_with_one_line(tiny_model, calib):
    for kwargs, message in [
        (dict(method="sparsegpt"), "unknown method"),
        (dict(block_metric="l7"), "unknown block metric"),
        (dict(channel_metric="nope"), "unknown channel metric"),
        (dict(allocation="random"), "unknown allocation"),
        (dict(multiple=0), "multiple must be"),
        (dict(rounding="up"), "unknown rounding"),
    ]:
        with pytest.raises(cfsp.CfspError, match=message) as info:
            cfsp.prune(tiny_model, calib, 0.5, progress=False, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(cfsp.CfspError, match="needs calibration"):
        cfsp.prune(tiny_model, None, 0.5)
    assert ffn_widths(tiny_model) == [256] * 4  # nothing was pruned by the refused calls


def test_nan_activations_are_reported(calib):
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(cfsp.CfspError, match="NaN or inf .* block 1.*float32"):
        cfsp.prune(model, calib, 0.5, progress=False)


def test_unsupported_architecture_is_named(calib):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=260))
    with pytest.raises(cfsp.CfspError, match="unsupported architecture 'gpt2'.*gate_proj"):
        cfsp.prune(gpt2, calib, 0.5)


def test_sequential_scores_each_block_on_the_pruned_prefix(calib):
    """Block l's channels are the top-w on activations of a model whose blocks < l are already pruned."""
    from conftest import make_tiny_model

    from cfsp.allocation import top_channels
    from cfsp.scoring import ChannelInputs, channel_scores
    from cfsp.surgery import slice_mlp

    options = dict(multiple=32, temperature=50.0, progress=False, **REFERENCE_SCORE)
    dense = cfsp.prune(make_tiny_model("qwen3"), calib, 0.5, **options)
    model = make_tiny_model("qwen3")
    result = cfsp.prune(model, calib, 0.5, sequential=True, **options)
    assert result.widths == dense.widths
    assert result.kept_channels[0].tolist() == dense.kept_channels[0].tolist()

    expected = make_tiny_model("qwen3")
    for index, width in enumerate(dense.widths):
        stats = calibrate(expected, calib, progress=False)[index]
        mlp = expected.model.layers[index].mlp
        inputs = ChannelInputs(mlp.down_proj.weight, mlp.up_proj.weight, mlp.gate_proj.weight, stats)
        kept = top_channels(channel_scores("cfsp_paper", inputs), width)
        assert result.kept_channels[index].tolist() == kept.tolist(), index
        slice_mlp(mlp, kept)
    with torch.no_grad():
        assert torch.allclose(model(calib[:2]).logits, expected(calib[:2]).logits, atol=1e-5)
    assert any(
        a.tolist() != b.tolist() for a, b in zip(result.kept_channels, dense.kept_channels, strict=True)
    )


def test_baselines_in_reference_mode_match_the_reference_formulas(family, calib):
    from conftest import make_tiny_model

    dense = make_tiny_model(family)
    stats = reference_impl.collect(dense, calib)
    expected = {
        "wanda-sp": reference_impl.wanda_sp(dense, stats, 0.4),
        "flap": reference_impl.flap(dense, stats, 0.4)[0],
        "magnitude-sp": reference_impl.magnitude_sp(dense, 0.4),
    }
    for method, kept in expected.items():
        result = cfsp.prune(
            make_tiny_model(family), calib, 0.4, method=method, reference=True, progress=False
        )
        assert [k.tolist() for k in result.kept_channels] == [k.tolist() for k in kept], method
    flap = cfsp.prune(make_tiny_model(family), calib, 0.4, method="flap", reference=True, progress=False)
    for ours, theirs in zip(flap.down_biases, reference_impl.flap(dense, stats, 0.4)[1], strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-8)


def test_cfsp_defaults_and_their_reference_counterparts(calib):
    from conftest import make_tiny_model

    default = cfsp.prune(make_tiny_model("llama"), calib, 0.5, multiple=32, progress=False)
    assert default.options["channel_metric"] == "ria" and default.down_biases is not None
    exact = cfsp.prune(make_tiny_model("llama"), calib, 0.5, multiple=32, reference=True, progress=False)
    assert exact.options["channel_metric"] == "cfsp_paper" and exact.down_biases is None


@pytest.mark.parametrize("options", [dict(), dict(sequential=True), dict(compensation="refit")])
def test_offloaded_activations_give_the_same_model(calib, options):
    """Activations parked on the CPU between blocks change where tensors wait, not what is computed."""
    results, logits = [], []
    for offload in (False, True):
        model = make_tiny_model("qwen2")
        results.append(
            cfsp.prune(model, calib, 0.5, multiple=32, progress=False, offload_activations=offload, **options)
        )
        with torch.no_grad():
            logits.append(model(calib[:2]).logits)
    assert [k.tolist() for k in results[0].kept_channels] == [k.tolist() for k in results[1].kept_channels]
    assert torch.equal(logits[0], logits[1])


def test_a_model_dispatched_by_accelerate_prunes_and_keeps_its_hooks(calib):
    """device_map="auto" wraps each block's forward in a hook that moves inputs to the block's
    device; the calibration pass must run through it and leave it in place."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    plain, hooked = make_tiny_model("llama"), make_tiny_model("llama")
    for block in hooked.model.layers:
        add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    expected = cfsp.prune(plain, calib, 0.5, multiple=32, progress=False)
    result = cfsp.prune(hooked, calib, 0.5, multiple=32, progress=False)
    assert [k.tolist() for k in result.kept_channels] == [k.tolist() for k in expected.kept_channels]
    assert all("forward" in block.__dict__ and hasattr(block, "_hf_hook") for block in hooked.model.layers)
    with torch.no_grad():
        assert torch.equal(hooked(calib[:2]).logits, plain(calib[:2]).logits)


def test_offloaded_weights_are_refused_in_one_line(calib):
    model = make_tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(256, 64, device="meta"))
    with pytest.raises(cfsp.CfspError, match="weights are offloaded"):
        cfsp.prune(model, calib, 0.5, multiple=32, progress=False)


@pytest.mark.parametrize("rounding", ["budget", "nearest"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5])
def test_a_multiple_wider_than_the_ffn_is_an_error_not_a_larger_model(calib, rounding, sparsity):
    """Every block would keep all 256 channels and gain a compensation bias: refused before any
    work, with or without --allow-inexact."""
    model = make_tiny_model("llama")
    for allow in (False, True):
        with pytest.raises(cfsp.CfspError, match="not below the FFN width"):
            cfsp.prune(model, calib, sparsity, multiple=100000, rounding=rounding, allow_inexact=allow,
                       progress=False)  # fmt: skip
    assert cfsp.models.ffn_widths(model) == [256] * 4
