"""Keep fractions, widths and global thresholds."""

import pytest
import torch

from cfsp import allocation as alloc


def test_temperature_form_equals_reference_scaling():
    g = torch.Generator().manual_seed(0)
    tokens = 8 * 256
    means = (torch.rand(12, generator=g) * 0.3).tolist()
    sums = [m * tokens for m in means]
    for p in (0.2, 0.5, 0.7):
        ours = alloc.cfsp_keep_fractions(means, p, temperature=tokens / 1e4)
        ref = alloc.reference_keep_fractions(sums, p)
        assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 1e-12
        assert abs(sum(ours) / len(ours) - (1 - p)) < 1e-9


def test_spread_is_shrunk_when_a_block_would_keep_everything():
    keep = alloc.cfsp_keep_fractions([0.0] * 9 + [1.0], 0.5, temperature=100.0)
    assert max(keep) < 1.0
    assert abs(sum(keep) / len(keep) - 0.5) < 1e-9


def test_round_width_bounds():
    assert alloc.round_width(740, 1536, 128) == 768
    assert alloc.round_width(700, 1536, 128) == 640
    assert alloc.round_width(10, 1536, 128) == 128  # never 0
    assert alloc.round_width(1600, 1536, 128) == 1536  # never more than the original
    assert alloc.round_width(50, 96, 128) == 96  # full width when smaller than one multiple
    assert alloc.round_width(0.2, 10, 1) == 1


def test_budget_rounding_hits_the_total_that_nearest_misses():
    # four blocks each asking for 700 of 1536: nearest rounds every one down to 640 (total 2560);
    # budget adds one multiple to a block while the shortfall is at least half a multiple
    # (240 -> 112 -> -16), so the total is 2816 against 2800 requested.
    targets = [700.0, 700.0, 700.0, 700.0]
    full = [1536] * 4
    assert alloc.round_widths(targets, full, 128, "nearest") == [640] * 4
    budget = alloc.round_widths(targets, full, 128, "budget")
    assert sum(budget) == 2816 and sorted(budget) == [640, 640, 768, 768]
    assert abs(sum(budget) - sum(targets)) <= 64


def test_budget_rounding_prefers_largest_remainders_and_respects_bounds():
    targets = [1500.0, 130.0, 250.0, 20.0]
    full = [1536, 1536, 1536, 100]
    widths = alloc.round_widths(targets, full, 128, "budget")
    # floors: 1408, 128, 128, 100 (full, smaller than one multiple) -> 1764 of 1900 requested;
    # remainders 92, 2, 122, -80: block 2 gets +128 (1892), then 8 short < 64: stop.
    assert widths == [1408, 128, 256, 100]
    assert all(w % 128 == 0 or w == d for w, d in zip(widths, full, strict=True))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        full = [1536] * 30
        targets = (128 + torch.rand(30, generator=g) * (1536 - 128)).tolist()
        widths = alloc.round_widths(targets, full, 128, "budget")
        assert all(128 <= w <= 1536 and w % 128 == 0 for w in widths)
        assert abs(sum(widths) - sum(targets)) <= 64


def test_reference_widths_quirks():
    assert alloc.reference_widths([0.5], [1536], 128) == [768]
    assert alloc.reference_widths([0.01], [1536], 128) == [0]  # the reference keeps everything then
    assert alloc.reference_kept_channels(torch.arange(5.0), 0).numel() == 5
    assert alloc.reference_widths([0.5], [100], 1) == [51]  # int(D * keep) + 1


def test_topk_is_exact_but_reference_threshold_keeps_ties():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5])
    assert alloc.top_channels(scores, 2).numel() == 2
    assert alloc.reference_kept_channels(scores, 2).tolist() == [0, 2, 3]


def test_global_threshold_removes_requested_total_within_one_channel():
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(d, generator=g) * s for d, s in [(100, 1.0), (37, 5.0), (64, 0.1), (203, 2.0)]]
    total = sum(b.numel() for b in blocks)
    for p in (0.1, 0.33, 0.5, 0.9):
        widths = alloc.global_widths(blocks, p)
        assert abs((total - sum(widths)) - total * p) <= 1.0
        assert min(widths) >= 1
        ref = alloc.reference_global_kept(blocks, p)
        assert abs(sum(k.numel() for k in ref) - int(total * (1 - p))) <= 1


def test_global_selection_uses_per_block_standardised_scores():
    high = torch.tensor([100.0, 101.0, 102.0, 103.0])
    low = torch.tensor([0.0, 1.0, 2.0, 3.0])
    # after standardisation both blocks are identical, so each keeps the same count
    assert alloc.global_widths([high, low], 0.5) == [2, 2]


def test_keep_fractions_meet_the_sparsity_over_unequal_widths():
    """Blocks of different FFN widths (Gemma 4's double-wide layers): the kept channels, not the
    mean fraction, come to 1 - p of the total; equal widths give the plain mean as before."""
    importance = [0.1, 0.3, 0.2, 0.4]
    widths = [256, 256, 512, 512]
    keep = alloc.cfsp_keep_fractions(importance, 0.5, 13.1, widths)
    assert sum(k * w for k, w in zip(keep, widths, strict=True)) == pytest.approx(0.5 * sum(widths))
    assert alloc.cfsp_keep_fractions(importance, 0.5, 13.1, [256] * 4) == alloc.cfsp_keep_fractions(
        importance, 0.5, 13.1
    )
