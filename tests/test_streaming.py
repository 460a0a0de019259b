"""Streaming pruning from safetensors equals in-memory pruning: channels, widths, weights, logits."""

import json

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_model

import cfsp
from cfsp.streaming import prune_directory


def _source(family, tmp_path, shard=False):
    folder = tmp_path / f"{family}-source"
    model = make_tiny_model(family)
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "5GB")
    make_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(method="flap"),
        dict(method="magnitude-sp"),
        dict(sequential=True),
        dict(sequential=True, compensation="refit"),
        dict(compensation="refit"),
        dict(max_memory=1.0),  # streamed with every Gram matrix held: one pass, the same weights
        dict(sequential=True, offload_activations=True),
        dict(compensation="reconstruct", reconstruct_epochs=2, reconstruct_holdout=0.0),
        dict(
            compensation="reconstruct",
            reconstruct_epochs=2,
            reconstruct_inputs="pruned",
            reconstruct_target="block",
            offload_activations=True,
        ),  # fmt: skip
    ],
)
def test_streamed_pruning_equals_in_memory_pruning(family, calib, tmp_path, options):
    source = _source(family, tmp_path, shard=family == "llama")
    model, tokenizer = cfsp.load_model(source, device="cpu")
    expected = cfsp.prune(model, calib, 0.5, multiple=32, progress=False, **options)
    with torch.no_grad():
        logits = model(calib[:2]).logits

    out = tmp_path / "streamed"
    result = prune_directory(source, calib, 0.5, out, device="cpu", multiple=32, progress=False, **options)
    assert result.widths == expected.widths
    assert [k.tolist() for k in result.kept_channels] == [k.tolist() for k in expected.kept_channels]
    assert result.params_before == expected.params_before and result.params_after == expected.params_after
    index = json.loads((out / "model.safetensors.index.json").read_text())
    outside = [k for k in index["weight_map"] if not k.startswith("model.layers.")]
    # a shard per block, and one per tensor outside the blocks (embeddings, final norm, LM head)
    assert len(set(index["weight_map"].values())) == len(expected.widths) + len(outside)
    reloaded, tok = cfsp.load_pruned(out, device="cpu")
    assert tok is not None
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, "streamed"])


def test_streaming_needs_safetensors(calib, tmp_path):
    source = _source("qwen2", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(cfsp.CfspError, match="no safetensors weights"):
        prune_directory(tmp_path / "empty", calib, 0.5, tmp_path / "x", device="cpu")
    assert not (tmp_path / "x").exists()


def test_a_directory_loaded_whole_tensor_by_tensor_equals_from_pretrained(family, tmp_path):
    """``--no-stream`` reads each tensor into storage of its own (so what pruning removes is
    freed); the model is the one from_pretrained builds, ties included."""
    from cfsp.streaming import load_whole

    source = _source(family, tmp_path, shard=family == "llama")
    expected, _ = cfsp.load_model(source, device="cpu")
    model = load_whole(source, device="cpu")
    assert type(model) is type(expected)
    state, want = model.state_dict(), expected.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    tied = expected.get_output_embeddings().weight is expected.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
