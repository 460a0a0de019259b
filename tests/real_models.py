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
from cfsp.experts import find_moe

CONFIG_DIR = Path(__file__).parent / "real_configs"
# Mixture-of-experts families (routed experts; tests/test_moe.py): their published config files, and
# their config classes' defaults where no published file was found.
MOE_CONFIGS = [  # published config files (real_configs/SOURCES.md)
    "qwen3-30b-a3b",
    "qwen2-57b-a14b",
    "mixtral-8x7b",
    "gpt-oss-20b",
    "deepseek-v3",
    "kimi-k2",
    "glm-4.5-air",
    "qwen3-next-80b-a3b",
    "qwen3.5-moe",
    "gemma-4-moe",
]
MOE_DEFAULT_CONFIGS = ["olmoe", "ernie4_5_moe", "granitemoe", "hunyuan_v1_moe", "minimax"]  # no file found
REAL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p.stem not in MOE_CONFIGS)  # dense
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
    if name in DEFAULT_CONFIGS or not (CONFIG_DIR / f"{name}.json").is_file():
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
    model_type = config.pop("model_type")
    return AutoConfig.for_model(SAME_CLASS.get(model_type, model_type), **config)


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


# Mixture-of-experts sizes: routed experts shrink to 16 (four per group under group-limited routing,
# at least twice top-k); top-k, groups, shared experts, dense prefixes and every id stay as published.
# Published configs whose model type transformers builds under its own class's name.
SAME_CLASS = {"kimi_k2": "deepseek_v3"}  # Kimi-K2 ships DeepseekV3ForCausalLM as remote code
MOE_WIDTH, MOE_EXPERTS = 32, 16
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_EXPERT_WIDTHS = ("moe_intermediate_size", "shared_expert_intermediate_size")


def shrunk_moe_config(name: str, vocab: int = VOCAB):
    """The MoE family's config shrunk in sizes: ``shrunk_config`` plus expert widths and counts."""
    config = shrunk_config(name, vocab)
    groups = getattr(config, "n_group", None) or 1
    for key in _EXPERT_COUNTS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > MOE_EXPERTS:
            setattr(config, key, 4 * groups if groups > 1 else MOE_EXPERTS)
    for key in _EXPERT_WIDTHS:
        if isinstance(getattr(config, key, None), int | list):
            setattr(config, key, MOE_WIDTH)
    top_k = getattr(config, "num_experts_per_tok", None) or 0
    top_k = top_k or getattr(config, "top_k_experts", None) or getattr(config, "moe_topk", None) or 1
    for key in _EXPERT_COUNTS:  # at least 8, and enough that half of them still cover top-k
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < max(8, 2 * top_k):
            setattr(config, key, max(8, 2 * top_k))
    if getattr(config, "kv_lora_rank", None):  # multi-head latent attention (DeepSeek-V3, Kimi-K2)
        for key, size in (
            ("qk_rope_head_dim", 16),
            ("qk_nope_head_dim", 16),
            ("v_head_dim", 16),
            ("head_dim", 16),
        ):
            if hasattr(config, key):
                setattr(config, key, size)
        if getattr(config, "q_lora_rank", None):
            config.q_lora_rank = 32
    types = getattr(config, "layer_types", None) or []
    if "linear_attention" in types and "full_attention" not in types:  # hybrids: one full-attention layer
        interval = raw_config(name).get("full_attention_interval", 4)
        config.num_hidden_layers = interval
        config.layer_types = ["linear_attention"] * (interval - 1) + ["full_attention"]
    dense_prefix = getattr(config, "first_k_dense_replace", None) or 0
    if dense_prefix:  # one dense block, then MoE blocks
        config.first_k_dense_replace = 1
        config.num_hidden_layers = max(config.num_hidden_layers, 3)
    return config


def make_moe_model(name: str, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """A random float32 MoE model of the family; routers spread so that routing is uneven."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shrunk_moe_config(name, vocab), dtype=torch.float32)
    with torch.no_grad():
        for block in layouts.decoder_layers(model):
            moe = find_moe(block)
            if moe is None:
                continue
            for param in moe.router.parameters():
                if param.dim() == 2 and param.shape[0] == moe.count:
                    param.normal_(0, 0.5)
            for param in moe.experts.parameters(recurse=False):  # experts of different sizes
                param.mul_(torch.rand(moe.count, *[1] * (param.dim() - 1)) * 2 + 0.1)
    return model.eval()
