"""Channel and block metrics against direct computations from weights and recorded activations."""

import math

import pytest
import torch

from cfsp.scoring import ChannelInputs, block_importance, channel_scores, reference_fluctuation
from cfsp.statistics import BlockStats, calibrate


def _stats_from(acts: torch.Tensor) -> BlockStats:
    """BlockStats built from raw intermediate activations [windows, tokens, D]."""
    stats = BlockStats()
    stats.add_channels(acts, per_window=True)
    stats.tokens = acts.shape[0] * acts.shape[1]
    stats.windows = acts.shape[0]
    return stats


@pytest.fixture
def block():
    g = torch.Generator().manual_seed(1)
    hidden, width = 12, 40
    acts = torch.randn(5, 7, width, generator=g, dtype=torch.float64) * torch.rand(width, generator=g) * 3
    return dict(
        down=torch.randn(hidden, width, generator=g, dtype=torch.float64),
        up=torch.randn(hidden, width, generator=g, dtype=torch.float64),
        gate=torch.randn(hidden, width, generator=g, dtype=torch.float64),
        acts=acts,
        stats=_stats_from(acts),
    )


def _inputs(block, **kw):
    return ChannelInputs(
        down_weight=block["down"],
        up_weight=block["up"].T,
        gate_weight=block["gate"].T,
        stats=block["stats"],
        **kw,
    )


def _rms(block):
    acts = block["acts"]
    return acts.pow(2).sum(dim=(0, 1)).div(acts.shape[0]).sqrt()


def test_cfsp_paper_ranks_exactly_as_activation_rms(block):
    scores = channel_scores("cfsp_paper", _inputs(block))
    rms = _rms(block)
    assert torch.equal(scores.argsort(), rms.argsort())
    # and the value is 3/H * A_j, whatever the weights
    assert torch.allclose(scores, 3 / block["down"].shape[0] * rms)


def test_wanda_magnitude_and_ria_match_direct_formulas(block):
    a = _rms(block)
    down, up, gate = block["down"], block["up"], block["gate"]
    wanda = torch.stack([sum(abs(down[i, j]) * a[j] for i in range(12)) / 12 for j in range(40)])
    assert torch.allclose(channel_scores("wanda_base", _inputs(block)), wanda)
    mag = torch.tensor(
        [math.sqrt(sum(down[i, j].item() ** 2 for i in range(12))) for j in range(40)]
    ).double()
    assert torch.allclose(channel_scores("mag_base", _inputs(block)), mag)
    ria = torch.zeros(40, dtype=torch.float64)
    for w in (down, up, gate):
        ria += ((w.abs() / w.abs().sum(1, keepdim=True) + w.abs() / w.abs().sum(0, keepdim=True)) * a).mean(0)
    scores = channel_scores("ria", _inputs(block))
    assert torch.allclose(scores, ria)
    assert not torch.equal(scores.argsort(), a.argsort())  # the weights change the ranking


def test_flap_score_plain_variance(block):
    acts = block["acts"].flatten(0, 1)
    expected = acts.var(dim=0, unbiased=False) * block["down"].pow(2).sum(0)
    assert torch.allclose(channel_scores("flap", _inputs(block)), expected)


def test_reference_fluctuation_follows_the_recurrence(block):
    acts = block["acts"]
    mean = torch.zeros(acts.shape[-1], dtype=torch.float64)
    fluct = torch.zeros_like(mean)
    for n, window in enumerate(acts):
        mean = mean * n / (n + 1) + window.mean(0) / (n + 1)  # updated in place first, as the reference
        if n == 0:
            fluct = torch.zeros_like(fluct)
        else:
            fluct = fluct * (n - 1) / n + (window - mean).pow(2).sum(0) / (n + 1)
    assert torch.allclose(reference_fluctuation(block["stats"]), fluct)
    reference_score = channel_scores("flap", _inputs(block, window_fluctuation=True))
    assert torch.allclose(reference_score, fluct * block["down"].pow(2).sum(0))


def test_block_metrics_are_means_of_token_distances(tiny_model, calib):
    captured = {}

    def hook(module, args, kwargs, output):
        captured["in"], captured["out"] = (args[0] if args else kwargs["hidden_states"]), output

    handle = tiny_model.model.layers[1].register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        tiny_model(calib, use_cache=False)
    handle.remove()
    stats = calibrate(tiny_model, calib, progress=False)
    x, y = captured["in"].double().flatten(0, 1), captured["out"].double().flatten(0, 1)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1, 1)
    expected = {
        "angular": (torch.arccos(cos) / math.pi).mean(),
        "cosine": (1 - cos).mean(),
        "mse": (y - x).pow(2).mean(),
        "mae": (y - x).abs().mean(),
    }
    for metric, value in expected.items():
        assert block_importance(stats, metric)[1] == pytest.approx(value.item(), rel=1e-4)
    assert block_importance(stats, "uniform") == [1.0] * len(stats)
