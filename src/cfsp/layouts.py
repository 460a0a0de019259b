"""Where things are in a model: its decoder blocks, the projections of each block's MLP, and the
per-block widths in its config. The one place that knows model layouts.

A *channel* is one intermediate neuron of a block's MLP: a row of every projection that feeds the
nonlinearity and a column of the projection after it. Three MLP layouts cover the dense decoders
of transformers:

- gated: ``down(act(gate(x)) * up(x))`` with separate ``gate_proj`` / ``up_proj`` (Llama, Qwen,
  Mistral, Gemma, OLMo, SmolLM, Granite, ...);
- fused: the same with one ``gate_up_proj`` whose first half of rows is the gate and second half
  the up projection (Phi-3 / Phi-4, GLM / GLM-4);
- plain: ``down(act(up(x)))`` (Starcoder2's ``c_fc`` / ``c_proj``, Apertus, Arcee, Nemotron).

A new family with another naming is one more entry in ``MLP_LAYOUTS``. This file needs only torch,
because it is also copied, unchanged, next to every saved pruned model (as ``layouts.py``) for the
modeling file there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MlpLayout:
    """Names of one MLP layout's projections inside ``block.mlp``."""

    kind: str  # "gated", "fused" or "plain"
    down: str  # the projection after the nonlinearity: its input columns are the channels
    up: str  # the projection whose output rows are the channels (fused: gate rows, then up rows)
    gate: str | None = None  # a separate gate projection (gated only)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The projections before the nonlinearity, each with the channels as its output rows."""
        return (self.gate, self.up) if self.gate else (self.up,)

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.inputs, self.down)


MLP_LAYOUTS = (
    MlpLayout("gated", down="down_proj", up="up_proj", gate="gate_proj"),
    MlpLayout("fused", down="down_proj", up="gate_up_proj"),
    MlpLayout("plain", down="down_proj", up="up_proj"),
    MlpLayout("plain", down="c_proj", up="c_fc"),
    MlpLayout("plain", down="fc2", up="fc1"),
)


# A norm some families apply to the MLP's output before adding it to the residual stream (Gemma 2-4,
# OLMo 2): block output = residual + norm(mlp(x)). Other families add the MLP output itself.
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")  # GLM-4: post_mlp_layernorm


def post_mlp_norm(block: nn.Module) -> nn.Module | None:
    """The norm between the block's MLP and its residual sum, if the family has one."""
    return next(
        (getattr(block, n) for n in POST_MLP_NORMS if isinstance(getattr(block, n, None), nn.Module)), None
    )


def post_attention_norm(block: nn.Module) -> nn.Module | None:
    """The norm between the block's attention and its residual sum, if the family has one.

    GLM-4 calls it ``post_self_attn_layernorm``. Gemma 2-4 and OLMo 2 call it
    ``post_attention_layernorm``, which in Llama-style blocks is instead the MLP's pre-norm: it is
    the attention's post-norm only where the MLP has a pre-norm of its own (Gemma) or the block
    has no pre-norms at all (OLMo 2).
    """
    norm = getattr(block, "post_self_attn_layernorm", None)
    if isinstance(norm, nn.Module):
        return norm
    norm = getattr(block, "post_attention_layernorm", None)
    own_pre_norm = hasattr(block, "pre_feedforward_layernorm") or not hasattr(block, "input_layernorm")
    return norm if isinstance(norm, nn.Module) and own_pre_norm else None


# ---------------------------------------------------------------------------------------------
# Attention sublayers. A dropped one is replaced by ``NoAttention``, which adds nothing to the
# residual stream, so the block computes x + mlp(norm(x)); the config says which blocks have none
# as transformers' per-layer ``skip`` list (``per_layer_config: {"3": {"skip": ["self_attn"]}}``).

ATTENTION = "self_attn"


class NoAttention(nn.Module):
    """Stands in for a dropped attention sublayer: its contribution is zero and it has no weights.

    transformers reads the cache's length from its first layer and each mask's size from the first
    layer of that kind, whichever blocks were dropped, so with a cache this sublayer stores a
    placeholder of one number per token (the real sublayer stored ``2 x kv_heads x head_dim``).
    llama.cpp and vLLM store nothing for it.
    """

    def __init__(self, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None:
            placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden), None


def has_attention(block: nn.Module) -> bool:
    """Whether the block has an attention sublayer cfsp can drop (hybrid models' linear-attention
    layers have none)."""
    attention = getattr(block, ATTENTION, None)
    return isinstance(attention, nn.Module) and not isinstance(attention, NoAttention)


def drop_attention(block: nn.Module) -> None:
    """Remove the block's attention sublayer (its norms stay: some families share them with the MLP)."""
    old = getattr(block, ATTENTION)
    layer_idx = getattr(old, "layer_idx", None)
    setattr(block, ATTENTION, NoAttention(layer_idx))


def dropped_attention(config) -> list[int]:
    """The blocks whose attention the config says is dropped."""
    overrides = per_layer_overrides(config)
    return sorted(i for i, values in overrides.items() if ATTENTION in (values.get("skip") or []))


def set_dropped_attention(config, blocks: list[int]) -> None:
    """Record the blocks without attention in ``per_layer_config``, keeping everything else."""
    overrides = per_layer_overrides(config)
    for index in blocks:
        values = overrides.setdefault(int(index), {})
        values["skip"] = sorted({*(values.get("skip") or []), ATTENTION})
    _set_overrides(config, overrides)


# ---------------------------------------------------------------------------------------------
# KV groups. Under grouped-query attention, query head h reads KV head h // (heads / kv_heads), so
# a KV group (one KV head and the query heads that read it) is a block of rows of q_proj, k_proj and
# v_proj and the matching columns of o_proj. Removing whole groups keeps every remaining head exact.

HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class HeadShape:
    """The head geometry of one attention sublayer."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def keeping(self, kv_heads: int) -> HeadShape:
        """The shape with only ``kv_heads`` of its KV groups left."""
        return HeadShape(kv_heads * self.group_size, kv_heads, self.head_dim)


def head_shape(attention: nn.Module) -> HeadShape | None:
    """The sublayer's heads, read from its projections; None where whole KV groups cannot be cut
    out: fused or missing projections, or a norm over all heads at once (OLMo 2's q_norm), whose
    statistics would change with the heads removed."""
    projections = [getattr(attention, n, None) for n in HEAD_PROJECTIONS]
    head_dim = getattr(attention, "head_dim", None)
    if not all(isinstance(p, nn.Linear) for p in projections) or not isinstance(head_dim, int):
        return None
    q, k, v, o = projections
    if q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features:
        return None
    if o.in_features != q.out_features:
        return None
    for norm in ("q_norm", "k_norm"):
        weight = getattr(getattr(attention, norm, None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.numel() != head_dim:
            return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv_heads:
        return None
    return HeadShape(heads, kv_heads, head_dim)


def group_rows(shape: HeadShape, groups: torch.Tensor, query: bool) -> torch.Tensor:
    """Rows of q_proj (``query``) or of k_proj / v_proj that belong to KV groups ``groups``; the
    query rows are also o_proj's input columns."""
    per_group = shape.head_dim * (shape.group_size if query else 1)
    offsets = torch.arange(per_group, device=groups.device)
    return (groups[:, None] * per_group + offsets).flatten()


def set_head_counts(config, shape: HeadShape) -> None:
    """The config's head counts after KV groups were removed from every attention sublayer; the
    head size is written out, since families derive it from the counts when it is absent."""
    config.num_attention_heads = shape.heads
    config.num_key_value_heads = shape.kv_heads
    config.head_dim = shape.head_dim


# Checkpoint names of the Llama-style layout (every family here keeps its blocks at model.layers;
# the GGUF export reads these names from the files).
BLOCKS = "model.layers"
EMBEDDINGS = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def block_tensor(index: int, name: str) -> str:
    """The checkpoint name of tensor ``name`` (e.g. ``mlp.down_proj.weight``) of block ``index``."""
    return f"{BLOCKS}.{index}.{name}"


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder blocks of a causal LM: ``model.model.layers`` in every supported family."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def find_layout(mlp: nn.Module | None) -> MlpLayout | None:
    """The first layout whose projections ``mlp`` has, all as ``nn.Linear``; None if none fits."""
    if mlp is None:
        return None
    for layout in MLP_LAYOUTS:
        if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in layout.names):
            return layout
    return None


def mlp_layout(mlp: nn.Module) -> MlpLayout:
    layout = find_layout(mlp)
    if layout is None:
        raise ValueError(f"{type(mlp).__name__} matches no known MLP layout")
    return layout


def mlp_width(mlp: nn.Module) -> int:
    """The FFN (intermediate) width of an MLP: the down projection's input size."""
    return getattr(mlp, mlp_layout(mlp).down).in_features


def down_projection(mlp: nn.Module) -> nn.Linear:
    return getattr(mlp, mlp_layout(mlp).down)


def channel_rows(layout: MlpLayout, name: str, kept: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of projection ``name`` that belong to channels ``kept`` (a fused matrix has two per channel)."""
    if layout.kind == "fused" and name == layout.up:
        return torch.cat([kept, kept + width])
    return kept


def input_weights(mlp: nn.Module) -> list[torch.Tensor]:
    """Every [D, H] weight that produces the channels (gate and up; a fused matrix split in two)."""
    layout = mlp_layout(mlp)
    if layout.kind == "fused":
        return list(getattr(mlp, layout.up).weight.chunk(2, dim=0))
    return [getattr(mlp, name).weight for name in layout.inputs]


def _new_linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_mlp(mlp: nn.Module, width: int, bias: bool = False) -> None:
    """Give ``mlp`` projections for ``width`` channels (uninitialised; weights are loaded afterwards).

    A projection has a bias if it had one or ``bias`` (cfsp's compensation bias) is asked for.
    """
    layout = mlp_layout(mlp)
    for name in layout.inputs:
        old = getattr(mlp, name)
        rows = 2 * width if layout.kind == "fused" else width
        setattr(mlp, name, _new_linear(old, old.in_features, rows, bias or old.bias is not None))
    old = getattr(mlp, layout.down)
    setattr(mlp, layout.down, _new_linear(old, width, old.out_features, bias or old.bias is not None))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width


# ---------------------------------------------------------------------------------------------
# Per-block widths in the config. transformers >= 5.2x parses ``per_layer_config`` into a spec
# that some families use for their own per-layer settings (Gemma 4: a larger head_dim on its
# global-attention layers); cfsp adds ``intermediate_size`` beside them and keeps everything else.


def per_layer_overrides(config) -> dict[int, dict]:
    """Every per-layer override of ``config`` (the family's own and cfsp's widths), by layer index."""
    spec = config.__dict__.get("_heterogeneity_spec")
    if spec is not None:
        return copy.deepcopy(spec.per_layer_overrides)
    raw = config.__dict__.get("per_layer_config") or {}
    return {int(k): dict(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def global_width(config) -> int:
    """The config's own ``intermediate_size``, which a per-layer override may hide."""
    if "_heterogeneity_spec" in config.__dict__:
        return config._getattr_without_heterogeneous_validation("intermediate_size")
    return config.intermediate_size


def layer_widths(config) -> list[int]:
    """FFN width of every block as the config states it (``per_layer_config`` or the global width)."""
    overrides = per_layer_overrides(config)
    default = global_width(config)
    return [
        int(overrides.get(i, {}).get("intermediate_size", default)) for i in range(config.num_hidden_layers)
    ]


def _set_overrides(config, overrides: dict[int, dict]) -> None:
    overrides = {i: v for i, v in overrides.items() if v}
    if isinstance(getattr(type(config), "per_layer_config", None), property):
        config.per_layer_config = overrides or None  # transformers' heterogeneous-config support
    elif overrides:
        config.per_layer_config = {str(i): v for i, v in overrides.items()}
    else:
        config.__dict__.pop("per_layer_config", None)


def set_layer_widths(config, widths: list[int]) -> None:
    """Record per-block FFN widths in ``per_layer_config``, keeping the family's other overrides."""
    overrides = per_layer_overrides(config)
    for index, width in enumerate(widths):
        overrides.setdefault(index, {})["intermediate_size"] = int(width)
    _set_overrides(config, overrides)


def set_uniform_width(config, width: int) -> None:
    """One FFN width for every block, as the config's own ``intermediate_size``: the stock form."""
    overrides = per_layer_overrides(config)
    for values in overrides.values():
        values.pop("intermediate_size", None)
    _set_overrides(config, overrides)
    config.intermediate_size = int(width)


def homogeneous_config(config):
    """A copy of ``config`` without cfsp's per-block widths and dropped sublayers, which the stock
    model class can build (the family's own per-layer settings stay)."""
    plain = copy.deepcopy(config)
    overrides = per_layer_overrides(plain)
    for values in overrides.values():
        values.pop("intermediate_size", None)
        values.pop("skip", None)
    _set_overrides(plain, overrides)
    return plain
