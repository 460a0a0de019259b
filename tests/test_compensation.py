"""Compensation rules: none, mean bias, and the least-squares refit of down_proj."""

import pytest
import torch
from conftest import make_tiny_model

import cfsp
from cfsp.compensation import compensate
from cfsp.errors import CfspError
from cfsp.statistics import BlockStats, calibrate, symmetric_gram


def _stats(x: torch.Tensor) -> BlockStats:
    stats = BlockStats()
    stats.add_channels(x, second_moments=True)
    stats.tokens = x.shape[0] * x.shape[1]
    return stats


def _apply(fix, down, kept, x):
    weight = down[:, kept] if fix.weight is None else fix.weight
    bias = 0.0 if fix.bias is None else fix.bias
    return x[..., kept] @ weight.T + bias


def test_refit_with_every_channel_kept_reproduces_the_dense_output():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 16, generator=gen, dtype=torch.float64)
    down = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    kept = torch.arange(16)
    fix = compensate("refit", down, kept, _stats(x), damping=0.0)
    assert torch.allclose(fix.weight, down, atol=1e-9) and fix.bias.abs().max() < 1e-9
    damped = compensate("refit", down, kept, _stats(x), damping=1e-6)
    assert torch.allclose(_apply(damped, down, kept, x), x @ down.T, atol=1e-4)


def test_refit_is_exact_when_pruned_channels_are_linear_in_kept_ones():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 100, 6, generator=gen, dtype=torch.float64)
    mix = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    x = torch.cat([base, base @ mix + 0.5], dim=-1)  # channels 6..9 = linear in 0..5, plus a constant
    down = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    kept = torch.arange(6)
    fix = compensate("refit", down, kept, _stats(x), damping=0.0)
    assert torch.allclose(_apply(fix, down, kept, x), x @ down.T, atol=1e-8)
    mean_only = compensate("mean", down, kept, _stats(x), damping=0.0)
    assert (_apply(mean_only, down, kept, x) - x @ down.T).abs().max() > 0.1


def test_closed_form_equals_lstsq_on_the_recorded_activations():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 80, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, 12) + 1.0
    down = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 9, 11])
    fix = compensate("refit", down, kept, _stats(x), damping=0.0)
    flat = x.reshape(-1, 12)
    design = torch.cat([flat[:, kept], torch.ones(flat.shape[0], 1, dtype=flat.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, flat @ down.T).solution  # [k + 1, H]
    assert torch.allclose(fix.weight, solution[:-1].T, atol=1e-8)
    assert torch.allclose(fix.bias, solution[-1], atol=1e-8)


def test_refit_reconstructs_the_block_better_than_mean_or_none(calib):
    dense = make_tiny_model("llama")
    stats = calibrate(dense, calib, progress=False, second_moments=True)
    errors = {}
    for rule in ("none", "mean", "refit"):
        model = make_tiny_model("llama")
        result = cfsp.prune(model, calib, 0.5, multiple=32, compensation=rule, stats=stats, progress=False)
        assert result.options["compensation"] == rule
        layer = 0  # block 0 sees the same inputs in both models
        captured = {}
        hooks = [
            m.model.layers[layer].mlp.register_forward_hook(
                lambda mod, a, out, m=m, captured=captured: captured.__setitem__(m, out)
            )
            for m in (dense, model)
        ]
        with torch.no_grad():
            dense(calib), model(calib)
        for hook in hooks:
            hook.remove()
        errors[rule] = (captured[dense] - captured[model]).pow(2).mean().item()
    assert errors["refit"] < errors["mean"] < errors["none"]


def test_refit_models_reload_identically_and_plans_cannot_replay_them(calib, tokenizer, tmp_path):
    model = make_tiny_model("qwen2")
    result = cfsp.prune(
        model, calib, 0.5, multiple=32, compensation="refit", refit_damping=0.05, progress=False
    )
    with torch.no_grad():
        expected = model(calib[:2]).logits
    out = cfsp.save_pruned(model, tokenizer, result, tmp_path / "refit")
    plan = cfsp.read_plan(out)
    assert plan["options"]["compensation"] == "refit" and plan["options"]["refit_damping"] == 0.05
    reloaded, _ = cfsp.load_pruned(out)
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, expected)
    with pytest.raises(cfsp.CfspError, match="refit or trained the MLPs on calibration data"):
        cfsp.apply_plan(make_tiny_model("qwen2"), out)


def test_sequential_refit_and_bad_settings(calib):
    result = cfsp.prune(
        make_tiny_model("mistral"),
        calib,
        0.5,
        multiple=32,
        compensation="refit",
        sequential=True,
        progress=False,
    )
    assert result.realised_sparsity == 0.5
    for bad, message in (
        (dict(compensation="ols"), "unknown compensation"),
        (dict(refit_damping=-1), ">= 0"),
    ):
        with pytest.raises(cfsp.CfspError, match=message):
            cfsp.prune(make_tiny_model("llama"), calib, 0.5, progress=False, **bad)
    # statistics without Gram matrices: the refit collects them in its own second pass
    stats = calibrate(make_tiny_model("llama"), calib, progress=False)
    reused, fresh = make_tiny_model("llama"), make_tiny_model("llama")
    cfsp.prune(reused, calib, 0.5, multiple=32, stats=stats, progress=False)
    cfsp.prune(fresh, calib, 0.5, multiple=32, progress=False)
    with torch.no_grad():
        assert torch.equal(reused(calib[:2]).logits, fresh(calib[:2]).logits)
    with pytest.raises(cfsp.CfspError, match="pass calib beside stats"):
        cfsp.prune(make_tiny_model("llama"), None, 0.5, stats=stats, progress=False)


@pytest.mark.parametrize("shape", [(3, 1), (7, 5), (64, 130), (40, 257)])
def test_symmetric_gram_equals_the_full_product(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(symmetric_gram(x), x.T @ x, rtol=0, atol=1e-12)


def test_gram_over_batches_equals_one_product_over_all_tokens():
    x = torch.randn(6, 32, 24, generator=torch.Generator().manual_seed(4))
    stats = BlockStats()
    for batch in x.split(2):
        stats.add_channels(batch, second_moments=True)
    flat = x.flatten(0, 1).double()
    assert torch.allclose(stats.gram, flat.T @ flat, rtol=1e-6, atol=1e-5)


def test_non_finite_activations_stop_calibration_with_one_line():
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    calib = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    with pytest.raises(CfspError, match="NaN or inf in the activations of block 1"):
        calibrate(model, calib, progress=False)


def test_refit_without_intercept_equals_lstsq_without_intercept():
    """A stock (uniform) output has no MLP bias: the refit solves on uncentred moments."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 80, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, 12) + 1.0
    down = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    kept = torch.tensor([1, 2, 5, 8, 10])
    fix = compensate("refit", down, kept, _stats(x), damping=0.0, intercept=False)
    flat = x.reshape(-1, 12)
    solution = torch.linalg.lstsq(flat[:, kept], flat @ down.T).solution  # [k, H]
    assert fix.bias is None
    assert torch.allclose(fix.weight, solution.T, atol=1e-8)


@pytest.mark.parametrize("compensation", ["mean", "refit", "reconstruct"])
def test_pruned_weights_can_be_trained_afterwards(calib, compensation):
    """Slicing inside a calibration pass (inference mode) must still give ordinary parameters:
    recovery trains them next."""
    model = make_tiny_model("llama")
    cfsp.prune(model, calib, 0.5, compensation=compensation, reconstruct_epochs=1, progress=False)
    params = list(model.parameters())
    assert not any(p.is_inference() for p in params)
    loss = model(calib[:2], labels=calib[:2]).loss
    loss.backward()
    assert all(
        p.grad is not None for p in cfsp.models.block_mlp(cfsp.models.decoder_blocks(model)[0]).parameters()
    )
