"""Tiny models built from the published ``config.json`` of real checkpoints, shrunk only in sizes.

Every other key stays: pad/bos/eos ids, rope scaling, layer types, per-layer lists, biases,
activations. Ids that lie beyond the shrunk vocabulary move to its top, where the real model has
them (Qwen's pad id 151643 of 151936), because that is what breaks code that assumes small ids.
``real_configs/SOURCES.md`` says where each file comes from. Families without a file here are
built from their transformers config class's defaults (which describe the family's reference
checkpoint), shrunk the same way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cfsp import layouts

CONFIG_DIR = Path(__file__).parent / "real_configs"
REAL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
# Families that prune today and have no config file here: their config class's defaults.
DEFAULT_CONFIGS = [
    "ministral",
    "gemma2",
    "olmo3",
    "granite",
    "cohere2",
    "exaone4",
    "ernie4_5",
    "stablelm",
    "apertus",
    "arcee",
    "nemotron",
    "gemma4_text",  # the defaults have per-layer embeddings (a second token-indexed table)
]
HIDDEN, HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 16, 256, 512


def raw_config(name: str) -> dict:
    """The published config (the text part of a multimodal one), or the config class's defaults."""
    if name in DEFAULT_CONFIGS:
        return AutoConfig.for_model(name).to_dict()
    config = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return dict(config["text_config"]) if "text_config" in config else config


def _layer_count(config: dict) -> int:
    """Enough layers to hold every layer type once (and Gemma 4's rule that the last is global)."""
    types = config.get("layer_types")
    if not types:
        return 2
    needed = max(types.index(kind) for kind in set(types)) + 1
    return max(2, needed)


def _remap_ids(config: dict, vocab: int) -> None:
    """Special ids beyond the shrunk vocabulary go to its top, keeping their order."""
    keys = [k for k in config if k.endswith("_token_id") or k == "eos_token_id"]
    ids = set()
    for key in keys:
        value = config[key]
        ids |= set(value) if isinstance(value, list) else {value}
    large = sorted(i for i in ids if isinstance(i, int) and i >= vocab)
    mapping = {old: vocab - len(large) + rank for rank, old in enumerate(large)}
    for key in keys:
        value = config[key]
        if isinstance(value, list):
            config[key] = [mapping.get(v, v) for v in value]
        elif isinstance(value, int):
            config[key] = mapping.get(value, value)


def shrunk_config(name: str, vocab: int = VOCAB, heads: int = HEADS):
    """The family's config with sizes shrunk so a model builds and runs in well under a second;
    ``heads`` query heads, with the published ratio of query heads to KV heads."""
    config = copy.deepcopy(raw_config(name))
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    layers, old_layers = _layer_count(config), config["num_hidden_layers"]
    for key, value in list(config.items()):  # per-layer lists (layer types, no-rope layers, ...)
        if isinstance(value, list) and len(value) == old_layers:
            config[key] = value[:layers]
    published = config.get("num_attention_heads") or HEADS
    kv = max(1, heads * (config.get("num_key_value_heads") or published) // published)
    while heads % kv:
        kv -= 1
    head_dim = 2 * HEAD_DIM if config.get("partial_rotary_factor", 1.0) < 0.5 else HEAD_DIM
    config.update(
        hidden_size=HIDDEN,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        vocab_size=vocab,
    )
    if "head_dim" in config:
        config["head_dim"] = head_dim
    if config.get("max_window_layers"):
        config["max_window_layers"] = min(config["max_window_layers"], layers)
    if config.get("sliding_window"):
        config["sliding_window"] = 16  # shorter than the test windows, so the sliding mask matters
    for key, size in (
        ("global_head_dim", 2 * head_dim),
        ("num_global_key_value_heads", 1),
        ("hidden_size_per_layer_input", 16),
        ("linear_key_head_dim", 16),
        ("linear_value_head_dim", 16),
        ("linear_num_key_heads", 2),
        ("linear_num_value_heads", 2),
        ("kv_lora_rank", 16),
    ):
        if config.get(key):
            config[key] = size
    per_layer = config.get("per_layer_config")
    if isinstance(per_layer, dict):  # the family's own per-layer sizes (Gemma 4's global heads)
        sizes = {"head_dim": 2 * head_dim, "num_key_value_heads": 1, "intermediate_size": FFN}
        config["per_layer_config"] = {
            key: {k: sizes.get(k, v) for k, v in values.items()}
            for key, values in per_layer.items()
            if int(key) < layers
        }
    if config.get("vocab_size_per_layer_input"):
        config["vocab_size_per_layer_input"] = vocab
    _shrink_rope(config, config.get("head_dim") or HIDDEN // heads)
    _remap_ids(config, vocab)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def _shrink_rope(config: dict, head_dim: int) -> None:
    """Per-frequency rope lists (Phi's longrope factors, Qwen's mrope sections) follow the rotary
    width of the shrunk heads; every scalar setting stays."""
    rotary_pairs = int(head_dim * config.get("partial_rotary_factor", 1.0)) // 2
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if not isinstance(rope, dict):
            continue
        for field in ("long_factor", "short_factor"):
            if isinstance(rope.get(field), list):
                rope[field] = rope[field][:rotary_pairs]
        sections = rope.get("mrope_section")
        if isinstance(sections, list):
            pairs = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
            scaled = [max(1, s * pairs // sum(sections)) for s in sections]
            scaled[0] += pairs - sum(scaled)
            rope["mrope_section"] = scaled


def gemma4_small_config():
    """Gemma 4's small-model layout (E2B / E4B) from the class defaults: per-layer embeddings, the
    last layers reusing the K/V of earlier ones, and those layers' MLPs twice as wide."""
    config = shrunk_config("gemma4_text")
    config.num_hidden_layers = 8
    config.layer_types = (["sliding_attention"] * 3 + ["full_attention"]) * 2
    config.per_layer_config = {3: {"head_dim": 32}, 7: {"head_dim": 32}}
    config.num_kv_shared_layers, config.use_double_wide_mlp = 4, True
    return config


def make_real_model(name: str, seed: int = 0, vocab: int = VOCAB, heads: int = HEADS) -> torch.nn.Module:
    """A random float32 model of the family, with channel scales spread so rankings mean something."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shrunk_config(name, vocab, heads), dtype=torch.float32)
    with torch.no_grad():
        for block in layouts.decoder_layers(model):
            for weight in layouts.input_weights(block.mlp)[-1:]:  # the up rows (a view of a fused matrix)
                weight.mul_(torch.rand(weight.shape[0], 1) * 2 + 0.1)
    return model.eval()
