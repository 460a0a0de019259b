"""Physical slicing of the MLPs and the matching config update.

Knows nothing about scores: it takes the kept channel indices (and an optional down_proj bias)
per block and returns a smaller dense model.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from cfsp import layouts


def _sliced_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    # Slicing also runs inside a calibration pass (inference mode), but the new parameters must be
    # ordinary tensors: recovery trains them afterwards.
    with torch.inference_mode(False), torch.no_grad():
        new = torch.nn.utils.skip_init(  # no random init of weights that are overwritten at once
            nn.Linear,
            weight.shape[1],
            weight.shape[0],
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(old.weight.requires_grad)
    return new


def slice_mlp(
    mlp: nn.Module,
    kept: torch.Tensor,
    down_bias: torch.Tensor | None = None,
    with_bias: bool = False,
    down_weight: torch.Tensor | None = None,
):
    """Keep channels ``kept``: their rows of every projection before the nonlinearity and their
    columns of the one after it.

    ``with_bias`` gives every projection a bias (zeros where there was none) so that the saved
    config can say ``mlp_bias: true``; ``down_bias`` is added to the down projection's bias;
    ``down_weight`` [H, len(kept)] replaces its kept columns (a refit).
    """
    layout = layouts.mlp_layout(mlp)
    down = getattr(mlp, layout.down)
    width = down.in_features
    kept = kept.to(down.weight.device)

    def bias_of(linear: nn.Linear, rows: torch.Tensor | None) -> torch.Tensor | None:
        if linear.bias is not None:
            return linear.bias.detach()[rows] if rows is not None else linear.bias.detach().clone()
        if not with_bias:
            return None
        size = rows.numel() if rows is not None else linear.out_features
        return torch.zeros(size, dtype=linear.weight.dtype, device=linear.weight.device)

    new_down_bias = bias_of(down, None)
    if down_bias is not None:
        extra = down_bias.to(down.weight.dtype).to(down.weight.device)
        new_down_bias = extra if new_down_bias is None else new_down_bias + extra
    for name in layout.inputs:
        linear = getattr(mlp, name)
        rows = layouts.channel_rows(layout, name, kept, width)
        setattr(mlp, name, _sliced_linear(linear, linear.weight.detach()[rows], bias_of(linear, rows)))
    if down_weight is None:
        down_weight = down.weight.detach()[:, kept]
    down_weight = down_weight.to(device=down.weight.device, dtype=down.weight.dtype)
    setattr(mlp, layout.down, _sliced_linear(down, down_weight, new_down_bias))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(kept.numel())


def slice_kv_groups(attention: nn.Module, kept: torch.Tensor, out_weight: torch.Tensor | None = None) -> None:
    """Keep KV groups ``kept`` of an attention sublayer: their rows of q/k/v_proj and their columns
    of o_proj (``out_weight`` [hidden, kept columns] replaces those columns: a refit)."""
    shape = layouts.head_shape(attention)
    kept = kept.to(attention.q_proj.weight.device)
    query, kv = layouts.group_rows(shape, kept, True), layouts.group_rows(shape, kept, False)
    for name, rows in (("q_proj", query), ("k_proj", kv), ("v_proj", kv)):
        old = getattr(attention, name)
        bias = None if old.bias is None else old.bias.detach()[rows]
        setattr(attention, name, _sliced_linear(old, old.weight.detach()[rows], bias))
    old = attention.o_proj
    weight = old.weight.detach()[:, query] if out_weight is None else out_weight
    bias = None if old.bias is None else old.bias.detach()
    attention.o_proj = _sliced_linear(old, weight.to(old.weight.device, old.weight.dtype), bias)
    for name in ("num_heads", "num_attention_heads"):  # families that keep the counts on the module
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, len(kept) * shape.group_size)
    for name in ("num_key_value_heads", "num_kv_heads"):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, len(kept))


def set_config_widths(config, widths: list[int], mlp_bias: bool, uniform: bool = False) -> None:
    """Record per-block widths in ``per_layer_config`` (the global width stays the original), or,
    for a uniform output, the one width as the config's own ``intermediate_size``."""
    if uniform:
        layouts.set_uniform_width(config, widths[0])
    else:
        layouts.set_layer_widths(config, widths)
    if mlp_bias:
        config.mlp_bias = True


def needs_bias(model: nn.Module, compensated: bool) -> bool:
    """Whether every MLP projection gets a bias: a compensation writes one into the down
    projection, and the config's single ``mlp_bias`` switch then covers all of them."""
    return compensated or bool(getattr(model.config, "mlp_bias", False))


@dataclass
class AttentionCut:
    """What happens to the attention sublayers: the blocks that lose theirs, and the KV groups the
    others keep (per block; None keeps all) with the head counts that leaves."""

    dropped: Collection[int] = ()
    kept_groups: list[torch.Tensor | None] | None = None
    heads: layouts.HeadShape | None = None

    def apply(self, index: int, block: nn.Module, out_weight: torch.Tensor | None = None) -> None:
        """Cut block ``index``'s attention (``out_weight``: a refit o_proj for its kept heads)."""
        if index in self.dropped:
            layouts.drop_attention(block)
        elif self.kept_groups is not None and self.kept_groups[index] is not None:
            slice_kv_groups(getattr(block, layouts.ATTENTION), self.kept_groups[index], out_weight)

    def record(self, config) -> None:
        layouts.set_dropped_attention(config, sorted(self.dropped))
        if self.heads is not None:
            layouts.set_head_counts(config, self.heads)
