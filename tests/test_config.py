"""PruneConfig: the one definition of the pruning options, their defaults and their checks."""

import dataclasses

import pytest
from conftest import make_tiny_model

import cfsp
from cfsp.config import REFERENCE_PRESET, PruneConfig, flat_option_names, option_help


def test_method_defaults_and_presets_fill_unset_options():
    config = PruneConfig()
    assert (config.channel_metric, config.allocation, config.multiple, config.compensation) == (
        "ria", "cfsp", 128, "refit"
    )  # fmt: skip
    assert (config.rounding, config.selection, config.importance_scale, config.fluctuation) == (
        "budget", "topk", "mean", "variance"
    )  # fmt: skip
    reference = PruneConfig(preset="reference")
    assert reference.channel_metric == "cfsp_paper" and reference.compensation == "none"
    assert {k: getattr(reference, k) for k in REFERENCE_PRESET} == REFERENCE_PRESET
    flap = PruneConfig(method="flap", preset="reference", rounding="budget")  # an explicit value wins
    assert flap.compensation == "mean" and flap.rounding == "budget" and flap.needs_window_stats
    assert not PruneConfig(method="flap").needs_window_stats
    assert not PruneConfig(method="magnitude-sp").needs_calibration
    assert PruneConfig(**config.to_dict()) == config  # a resolved config round-trips


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sparsity=1.0), "sparsity must be in"),
        (dict(sparsity=float("nan")), "finite number"),
        (dict(channel_metric="nope"), "unknown channel metric"),
        (dict(rounding="up"), "unknown rounding"),
        (dict(compensation="lstsq"), "unknown compensation"),
        (dict(method="obc"), "unknown method"),
        (dict(preset="paper"), "unknown preset"),
        (dict(multiple=0), "multiple must be >= 1"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(sequential=True, preset="reference"), "--sequential cannot be combined"),
    ],
)
def test_bad_options_fail_on_creation(options, message):
    with pytest.raises(cfsp.CfspError, match=message):
        PruneConfig(**options)


def test_prune_takes_a_config_or_keywords_and_records_the_config(calib):
    config = PruneConfig(sparsity=0.5, multiple=32)
    by_config = cfsp.prune(make_tiny_model("qwen2"), calib, config, progress=False)
    by_keywords = cfsp.prune(make_tiny_model("qwen2"), calib, 0.5, multiple=32, progress=False)
    assert by_config.options == by_keywords.options == config.to_dict()
    assert [k.tolist() for k in by_config.kept_channels] == [k.tolist() for k in by_keywords.kept_channels]
    replaced = cfsp.prune(make_tiny_model("qwen2"), calib, config, compensation="mean", progress=False)
    assert replaced.options == dataclasses.replace(config, compensation="mean").to_dict()


def test_the_older_bias_compensation_spelling_is_one_line(calib):
    with pytest.raises(cfsp.CfspError, match="compensation='mean'"):
        cfsp.prune(make_tiny_model("llama"), calib, 0.5, bias_compensation=True, progress=False)
    with pytest.raises(cfsp.CfspError, match="unknown pruning option"):
        cfsp.prune(make_tiny_model("llama"), calib, 0.5, temprature=2.0, progress=False)


def test_every_option_has_help():
    assert all(option_help(name) for name in flat_option_names())
    assert option_help("b") == option_help("weight_activation_exponent")  # the paper's name still works
