"""Device and dtype choice: every tensor follows the chosen device, and bad choices are one line."""

import pytest
import torch
from conftest import make_tiny_model

import cfsp
from cfsp.models import resolve_device, resolve_dtype, statistics_device


def test_auto_device_and_dtype_follow_the_hardware():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else device.type)
    assert resolve_device(None) == device and resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert statistics_device(torch.device("mps")) == torch.device("cpu")


@pytest.mark.parametrize(
    "bad, message", [("tpu", "unknown device|unsupported device"), ("cuda:x", "unknown device")]
)
def test_bad_devices_are_one_line(bad, message):
    with pytest.raises(cfsp.CfspError, match=message):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_missing_gpu_is_one_line():
    with pytest.raises(cfsp.CfspError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(cfsp.CfspError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_pruning_a_bfloat16_model_keeps_float64_statistics(calib):
    """The statistics do not depend on the model's dtype beyond rounding: widths are equal."""
    reference = cfsp.prune(make_tiny_model("llama"), calib, 0.5, multiple=32, progress=False)
    model = make_tiny_model("llama").to(torch.bfloat16)
    result = cfsp.prune(model, calib, 0.5, multiple=32, compensation="refit", progress=False)
    assert result.widths == reference.widths
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) / len(a)
        for a, b in zip(result.kept_channels, reference.kept_channels, strict=True)
    ]
    assert min(overlap) > 0.8, overlap
