"""A directory that vLLM serves with per-block FFN widths: the DeciLM / Nemotron-NAS layout.

vLLM's ``DeciLMForCausalLM`` (``model_type: nemotron-nas``) builds every block from its own entry
of ``block_configs``: ``attention.n_heads_in_group`` (query heads per KV head) and
``ffn.intermediate_size`` (or ``ffn.ffn_mult``). Its tensors carry the Llama names
(``model.layers.N.self_attn.q_proj.weight``, ``mlp.gate_proj``, ...), so a pruned Llama, Mistral
or Qwen2 directory needs only a new ``config.json`` and the small configuration class that parses
``block_configs`` (shipped as ``configuration_decilm.py``, named in ``auto_map``). Biases follow the
flags vLLM reads: ``qkv_bias`` for Qwen2's q/k/v biases, ``attention_bias`` for Llama's (o_proj
included), ``mlp_bias`` for the compensation bias in ``down_proj`` (every MLP projection then has
one; cfsp writes zeros for gate and up). Where every width is a multiple of 256, ``ffn_mult`` is
written too, for the nemotron-nas loaders of MLX-LM, SGLang and TensorRT-LLM, which read only it.
A block whose attention was dropped is ``attention.no_op``: vLLM builds neither its attention nor
its pre-attention norm (and allocates no KV cache for it), so that norm's weight is left out of
the copied safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cfsp import layouts
from cfsp.errors import CfspError
from cfsp.export.deci import EXPORTABLE, dropped_attention_from_config, layer_widths_from_config
from cfsp.outdir import StagedOutput

CONFIG_FILE = "configuration_decilm.py"
# Copied as they are: the weights (names already Llama's), tokenizer and generation settings.
CARRIED = ("model.safetensors", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
           "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
           "pruning_plan.json")  # fmt: skip

CONFIGURATION_SOURCE = '''"""DeciLM / Nemotron-NAS configuration: per-block attention and FFN settings (written by cfsp)."""

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig


@dataclass
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int = 1


@dataclass
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    intermediate_size: int | None = None
    ffn_mult: float | None = None


@dataclass
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def parse(cls, value):
        if isinstance(value, cls):
            return value
        return cls(AttentionConfig(**value.get("attention", {})), FFNConfig(**value.get("ffn", {})))


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=(), **kwargs):
        self.block_configs = [BlockConfig.parse(block) for block in block_configs]
        super().__init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        output["block_configs"] = [asdict(block) for block in self.block_configs]
        return output
'''


def vllm_config(config: dict) -> dict:
    """The nemotron-nas ``config.json`` of a pruned (or dense) Llama, Mistral or Qwen2 config."""
    kind = config.get("model_type")
    if kind not in EXPORTABLE:
        raise CfspError(
            f"cannot export a {kind} model for vLLM with per-block widths: vLLM's DeciLM layout is "
            f"Llama-style ({', '.join(EXPORTABLE)}); prune with --uniform for a stock checkpoint instead"
        )
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    widths = layer_widths_from_config(config)
    dropped = set(dropped_attention_from_config(config))
    if 0 in dropped:
        raise CfspError(
            "cannot export for vLLM: its DeciLM starts the residual stream in the first block's attention, "
            "which was dropped; serve this model with transformers or llama.cpp"
        )
    whole = all(w % 256 == 0 for w in widths)
    blocks = []
    for index, width in enumerate(widths):
        ffn = {"no_op": False, "replace_with_linear": False, "intermediate_size": int(width)}
        if whole:
            ffn["ffn_mult"] = 1.5 * width / hidden  # DeciLM: round_up(int(2 * mult * hidden / 3), 256)
        attention = {
            "no_op": index in dropped,
            "replace_with_linear": False,
            "n_heads_in_group": heads // kv_heads,
        }
        blocks.append({"attention": attention, "ffn": ffn})
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_theta",
            "rope_scaling", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id", "initializer_range", "torch_dtype", "dtype")  # fmt: skip
    out = {key: config[key] for key in keep if key in config}
    qwen2 = kind == "qwen2"
    out.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        auto_map={"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig"},
        block_configs=blocks,
        attention_bias=False if qwen2 else bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        intermediate_size=max(widths),
    )
    if qwen2:
        out["qkv_bias"] = True  # Qwen2 biases q, k and v but not o
    return out


def export_vllm(model: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a pruned (or dense) Llama / Mistral / Qwen2 directory as a vLLM DeciLM directory."""
    source = Path(model).expanduser()
    config_path = source / "config.json"
    if not config_path.is_file() or not any(source.glob("*.safetensors")):
        raise CfspError(
            f"{model} is not a safetensors model directory; export a pruned directory (cfsp prune --out) "
            "or a Hugging Face directory (cfsp convert for a .gguf)"
        )
    original = json.loads(config_path.read_text(encoding="utf-8"))
    config = vllm_config(original)
    # vLLM builds no pre-attention norm in a block without attention, so its weight must not be there
    unused = {
        layouts.block_tensor(i, "input_layernorm.weight") for i in dropped_attention_from_config(original)
    }
    with StagedOutput(out, overwrite, [source]) as folder:
        for path in sorted(source.iterdir()):
            if path.suffix == ".safetensors" and path.is_file() and unused:
                _copy_without(path, folder / path.name, unused)
            elif path.name == "model.safetensors.index.json" and unused:
                index = json.loads(path.read_text(encoding="utf-8"))
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in unused}
                (folder / path.name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            elif path.name in CARRIED or (path.suffix == ".safetensors" and path.is_file()):
                shutil.copyfile(path, folder / path.name)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / CONFIG_FILE).write_text(CONFIGURATION_SOURCE, encoding="utf-8")
    return Path(out)


def _copy_without(source: Path, target: Path, names: set[str]) -> None:
    """Copy one safetensors file without the tensors ``names`` (one file in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(source, framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key not in names}
    save_file(tensors, target, metadata=metadata)
