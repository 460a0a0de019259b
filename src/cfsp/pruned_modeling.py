"""Model classes for pruned checkpoints whose blocks have different FFN widths.

This file is self-contained (torch and transformers only) because it is also copied, unchanged
apart from a footer that names the class, into every saved pruned directory as ``modeling_cfsp.py``.
That lets ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` load the model
without cfsp installed, through the very code that ``cfsp.load_pruned`` uses.

The per-block widths live in ``config.json`` as ``per_layer_config`` (``{"<i>": {"intermediate_size":
w}}``); ``mlp_bias: true`` means every MLP projection has a bias (pruning with bias compensation
stores the compensation in ``down_proj.bias``).
"""

from __future__ import annotations

import copy

from torch import nn


def layer_widths(config) -> list[int]:
    """FFN width of every block, from ``per_layer_config`` (either the parsed view or a raw dict)."""
    count = config.num_hidden_layers
    per_layer = config.__dict__.get("_heterogeneity_spec")
    if per_layer is not None:  # transformers >= 5.2x parses per_layer_config into a spec
        overrides = per_layer.per_layer_overrides
        default = config._getattr_without_heterogeneous_validation("intermediate_size")
    else:
        raw = getattr(config, "per_layer_config", None) or {}
        overrides = {int(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}
        default = config.intermediate_size
    return [int(overrides.get(i, {}).get("intermediate_size", default)) for i in range(count)]


def homogeneous_config(config):
    """A copy of ``config`` without per-layer overrides, which stock model classes can build."""
    plain = copy.deepcopy(config)
    if "_heterogeneity_spec" in plain.__dict__:
        plain.per_layer_config = None
    else:
        plain.__dict__.pop("per_layer_config", None)
    return plain


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_mlps(model: nn.Module, widths: list[int], bias: bool = False) -> None:
    """Give block ``i`` an MLP of width ``widths[i]`` (uninitialised; weights are loaded afterwards)."""
    for block, width in zip(model.model.layers, widths, strict=True):
        mlp = block.mlp
        hidden = mlp.gate_proj.in_features
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, width, bias)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, width, bias)
        mlp.down_proj = _linear_like(mlp.down_proj, width, hidden, bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


class PrunedModelMixin:
    """Builds the stock model, then narrows each block's MLP to the width in the config."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(homogeneous_config(config), *args, **kwargs)
        resize_mlps(self, layer_widths(config), bias=bool(getattr(config, "mlp_bias", False)))
        self.config = config  # keep the per-layer widths so save_pretrained writes them back


def pruned_class(base: type) -> type:
    """The pruned variant of a transformers causal-LM class, e.g. ``LlamaForCausalLM``."""
    return type(f"Cfsp{base.__name__}", (PrunedModelMixin, base), {})
