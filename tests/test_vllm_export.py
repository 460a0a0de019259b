"""The vLLM (DeciLM / Nemotron-NAS) directory: config fields and every tensor name and shape that
vLLM's ``DeciLMForCausalLM`` builds from them (its rules, restated here; vLLM itself needs a GPU)."""

import json
import math

import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open
from test_export import bpe_tokenizer, pruned_directory
from transformers import AutoConfig

import cfsp
from cfsp.export.vllm import export_vllm


def vllm_expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """The parameters vLLM's DeciLM model loads, by checkpoint name, from a nemotron-nas config."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention_bias = getattr(config, "attention_bias", False) or getattr(config, "bias", False)
    bias_o_proj = attention_bias
    if hasattr(config, "qkv_bias"):
        attention_bias = config.qkv_bias
    expected = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, hidden)
    for i, block in enumerate(config.block_configs):
        prefix = f"model.layers.{i}."
        kv = heads // block.attention.n_heads_in_group
        width = block.ffn.intermediate_size
        if width is None:  # DeciLM's own rule for ffn_mult
            width = int(2 * block.ffn.ffn_mult * hidden / 3)
            width = width if width % 256 == 0 else width + 256 - width % 256
        shapes = {
            "self_attn.q_proj": (heads * head_dim, hidden),
            "self_attn.k_proj": (kv * head_dim, hidden),
            "self_attn.v_proj": (kv * head_dim, hidden),
            "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (width, hidden),
            "mlp.up_proj": (width, hidden),
            "mlp.down_proj": (hidden, width),
        }
        for name, shape in shapes.items():
            expected[prefix + name + ".weight"] = shape
            biased = config.mlp_bias if name.startswith("mlp") else (
                bias_o_proj if name.endswith("o_proj") else attention_bias
            )  # fmt: skip
            if biased:
                expected[prefix + name + ".bias"] = shape[:1]
        expected[prefix + "input_layernorm.weight"] = (hidden,)
        expected[prefix + "post_attention_layernorm.weight"] = (hidden,)
    return expected


def stored_tensors(folder) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_vllm_directory_has_every_tensor_deci_builds(family, tmp_path):
    _, result = pruned_directory(family, tmp_path / "pruned")  # FLAP widths, refit bias
    assert len(set(result.widths)) > 1
    export_vllm(tmp_path / "pruned", tmp_path / "vllm")
    raw = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas"
    config = AutoConfig.from_pretrained(tmp_path / "vllm", trust_remote_code=True)
    assert [b.ffn.intermediate_size for b in config.block_configs] == result.widths
    assert all(b.attention.n_heads_in_group == 2 and not b.attention.no_op for b in config.block_configs)
    assert config.mlp_bias is True and (getattr(config, "qkv_bias", False) is (family == "qwen2"))
    assert vllm_expected_tensors(config) == stored_tensors(tmp_path / "vllm")
    assert (
        json.loads(json.dumps(config.to_dict()))["block_configs"][0]["ffn"]["intermediate_size"]
        == result.widths[0]
    )


def test_ffn_mult_is_written_where_widths_are_multiples_of_256(tmp_path):
    model = make_tiny_model("llama")  # dense: 256 channels in every block
    model.save_pretrained(tmp_path / "dense")
    bpe_tokenizer().save_pretrained(tmp_path / "dense")
    export_vllm(tmp_path / "dense", tmp_path / "vllm")
    config = AutoConfig.from_pretrained(tmp_path / "vllm", trust_remote_code=True)
    for block in config.block_configs:
        rebuilt = int(2 * block.ffn.ffn_mult * config.hidden_size / 3)
        assert math.ceil(rebuilt / 256) * 256 == block.ffn.intermediate_size == 256
    assert not config.mlp_bias
    assert vllm_expected_tensors(config) == stored_tensors(tmp_path / "vllm")


def test_vllm_export_refuses_other_families_and_bad_inputs(tmp_path):
    from typer.testing import CliRunner

    from cfsp.cli import app

    model = make_tiny_model("qwen3")
    calib = torch.randint(4, 260, (16, 64), generator=torch.Generator().manual_seed(0))
    result = cfsp.prune(model, calib, 0.5, method="flap", progress=False)
    cfsp.save_pruned(model, None, result, tmp_path / "qwen3")
    done = CliRunner().invoke(
        app, ["export", str(tmp_path / "qwen3"), "--format", "vllm", "--out", str(tmp_path / "v")]
    )
    assert done.exit_code == 2 and "--uniform" in done.output and not (tmp_path / "v").exists()
    done = CliRunner().invoke(
        app, ["export", str(tmp_path / "qwen3"), "--format", "onnx", "--out", str(tmp_path / "v")]
    )
    assert done.exit_code == 2 and "unknown --format" in done.output
