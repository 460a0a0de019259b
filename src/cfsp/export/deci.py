"""The ``deci`` layout: which models llama.cpp runs with per-layer widths, their
hyper-parameters, and where each Hugging Face tensor goes (with the rotary permutation)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from cfsp import layouts
from cfsp.errors import CfspError
from cfsp.export.encoding import gguf_module

log = logging.getLogger("cfsp")


ARCH = "deci"
EXPORTABLE = ("llama", "mistral", "qwen2")
_NOT_EXPORTABLE = {
    "qwen3": "its attention normalises q and k per head, which llama.cpp's deci architecture lacks",
    "gemma3_text": "its blocks have four norms, scaled embeddings and sliding-window layers, which "
    "llama.cpp's deci architecture lacks",
}
_NOT_EXPORTABLE["gemma3"] = _NOT_EXPORTABLE["gemma3_text"]

_BLOCK_TENSORS = {  # Hugging Face name inside model.layers.N -> GGUF name inside blk.N
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {
    layouts.EMBEDDINGS: "token_embd.weight",
    layouts.FINAL_NORM: "output_norm.weight",
    layouts.LM_HEAD: "output.weight",
}


# --------------------------------------------------------------------------- hyper-parameters


@dataclass
class DeciShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    widths: list[int]
    vocab: int
    dropped_attention: tuple[int, ...] = ()  # blocks without attention: no heads, no KV cache

    def head_counts(self, kv: bool = False) -> list[int]:
        """Per-layer (KV) head counts; 0 for a block without attention, which deci skips."""
        heads = self.kv_heads if kv else self.heads
        return [0 if i in self.dropped_attention else heads for i in range(self.layers)]


def layer_widths_from_config(config: dict) -> list[int]:
    """Per-block FFN widths of a config dict (a pruned directory's ``per_layer_config``, or uniform)."""
    return layouts.layer_widths(SimpleNamespace(**config))


def dropped_attention_from_config(config: dict) -> list[int]:
    """Blocks of a config dict whose attention sublayer was dropped."""
    return layouts.dropped_attention(SimpleNamespace(**config))


def check_exportable(config: dict) -> DeciShape:
    """The shape of a Llama-style model llama.cpp can run with per-layer widths, or a one-line error."""
    kind = config.get("model_type")
    if kind not in EXPORTABLE:
        why = _NOT_EXPORTABLE.get(kind, "llama.cpp runs per-layer FFN widths only for Llama-style blocks")
        raise CfspError(
            f"cannot export a {str(kind).removesuffix('_text')} model with per-block widths to GGUF: {why}. "
            f"Supported: {', '.join(EXPORTABLE)}; prune with --uniform for a stock checkpoint that llama.cpp's "
            "own converter handles (a .gguf or named default: cfsp convert it to a directory first)"
        )
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CfspError("cannot export to GGUF: llama.cpp's deci architecture rotates every head dimension")
    widths = layer_widths_from_config(config)
    if any(w <= 0 for w in widths):
        raise CfspError(
            "cannot export to GGUF: a block has no FFN channels left, which llama.cpp's deci drops whole"
        )
    theta, rope_type, _ = rope_settings(config)
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise CfspError(
            f"cannot export to GGUF: rope scaling {rope_type!r} has no llama.cpp counterpart in deci"
        )
    window = config.get("sliding_window")
    if kind == "mistral" and window and window < int(config.get("max_position_embeddings", 0)):
        log.warning(
            f"llama.cpp attends to the whole context; the model's {window}-token sliding window only "
            "matters for longer prompts"
        )
    return DeciShape(
        layers=len(widths),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        widths=widths,
        vocab=int(config["vocab_size"]),
        dropped_attention=tuple(dropped_attention_from_config(config)),
    )


def rope_settings(config: dict) -> tuple[float, str, dict]:
    """(base, type, parameters) from transformers 5's ``rope_parameters`` or the older fields."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return theta, rope_type, params


def llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    """Llama-3's per-frequency rope scaling, as the factors llama.cpp divides each frequency by."""
    theta, _, params = rope_settings(config)
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_hyperparameters(writer, config: dict, shape: DeciShape) -> None:
    theta, rope_type, params = rope_settings(config)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(list(shape.widths))
    writer.add_head_count(shape.head_counts())
    writer.add_head_count_kv(shape.head_counts(kv=True))
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(shape.vocab)
    if rope_type in ("linear", "yarn"):
        gguf = gguf_module()
        kind = gguf.RopeScalingType.LINEAR if rope_type == "linear" else gguf.RopeScalingType.YARN
        writer.add_rope_scaling_type(kind)
        writer.add_rope_scaling_factor(float(params["factor"]))
        if rope_type == "yarn" and "original_max_position_embeddings" in params:
            writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))


# --------------------------------------------------------------------------- tensors


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from half-split (Hugging Face) to interleaved pairs (llama.cpp)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def tensor_plan(weights, config: dict, shape: DeciShape) -> list[tuple[str, str, Callable | None]]:
    """(GGUF name, Hugging Face name, transform) for every tensor the deci loader expects."""
    keys = set(weights.keys())
    plan = []
    for hf_name, gguf_name in _GLOBAL_TENSORS.items():
        if hf_name in keys:
            if hf_name == layouts.LM_HEAD and config.get("tie_word_embeddings"):
                continue
            plan.append((gguf_name, hf_name, None))
    attention_only = {hf for hf, gguf in _BLOCK_TENSORS.items() if gguf.startswith("attn")}
    unused = set()  # a dropped attention's pre-norm stays in the directory; deci has no place for it
    for i in range(shape.layers):
        for hf_part, gguf_part in _BLOCK_TENSORS.items():
            if i in shape.dropped_attention and hf_part in attention_only:
                unused |= {layouts.block_tensor(i, f"{hf_part}.{suffix}") for suffix in ("weight", "bias")}
                continue
            for suffix in ("weight", "bias"):
                hf_name = layouts.block_tensor(i, f"{hf_part}.{suffix}")
                if hf_name not in keys:
                    if suffix == "weight":
                        raise CfspError(f"the weights have no tensor {hf_name!r}; is this a complete model?")
                    continue
                transform = None
                if gguf_part == "attn_q":
                    transform = lambda t: permute_rotary(t, shape.heads)  # noqa: E731
                elif gguf_part == "attn_k":
                    transform = lambda t: permute_rotary(t, shape.kv_heads)  # noqa: E731
                plan.append((f"blk.{i}.{gguf_part}.{suffix}", hf_name, transform))
    unknown = keys - {hf for _, hf, _ in plan} - {layouts.LM_HEAD} - unused
    unknown = {k for k in unknown if not k.endswith("rotary_emb.inv_freq")}
    if unknown:
        raise CfspError(
            f"cannot export to GGUF: tensors without a llama.cpp counterpart: {', '.join(sorted(unknown)[:4])}"
        )
    return plan
