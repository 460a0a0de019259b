"""Physical slicing of the gated MLPs and the matching config update.

Knows nothing about scores: it takes the kept channel indices (and an optional down_proj bias)
per block and returns a smaller dense model.
"""

from __future__ import annotations

import torch
from torch import nn

from cfsp.models import block_mlp, decoder_blocks


def _sliced_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = torch.nn.utils.skip_init(  # no random init of weights that are overwritten at once
        nn.Linear,
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
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
    """Keep rows ``kept`` of gate/up and the same columns of down.

    ``with_bias`` gives every projection a bias (zeros where there was none) so that the saved
    config can say ``mlp_bias: true``; ``down_bias`` is added to down_proj's bias; ``down_weight``
    [H, len(kept)] replaces the kept columns of down (a refit).
    """
    kept = kept.to(mlp.down_proj.weight.device)

    def bias_of(linear: nn.Linear, rows: torch.Tensor | None) -> torch.Tensor | None:
        if linear.bias is not None:
            return linear.bias.detach()[rows] if rows is not None else linear.bias.detach().clone()
        if not with_bias:
            return None
        size = rows.numel() if rows is not None else linear.out_features
        return torch.zeros(size, dtype=linear.weight.dtype, device=linear.weight.device)

    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    new_down_bias = bias_of(down, None)
    if down_bias is not None:
        extra = down_bias.to(down.weight.dtype).to(down.weight.device)
        new_down_bias = extra if new_down_bias is None else new_down_bias + extra
    mlp.gate_proj = _sliced_linear(gate, gate.weight.detach()[kept], bias_of(gate, kept))
    mlp.up_proj = _sliced_linear(up, up.weight.detach()[kept], bias_of(up, kept))
    if down_weight is None:
        down_weight = down.weight.detach()[:, kept]
    down_weight = down_weight.to(device=down.weight.device, dtype=down.weight.dtype)
    mlp.down_proj = _sliced_linear(down, down_weight, new_down_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(kept.numel())


def set_config_widths(config, widths: list[int], mlp_bias: bool) -> None:
    """Record per-block widths as transformers' ``per_layer_config``; the global width stays the original."""
    per_layer = {i: {"intermediate_size": int(w)} for i, w in enumerate(widths)}
    if isinstance(getattr(type(config), "per_layer_config", None), property):
        config.per_layer_config = per_layer  # transformers' heterogeneous-config support
    else:
        config.per_layer_config = {str(i): v for i, v in per_layer.items()}
    if mlp_bias:
        config.mlp_bias = True


def apply_pruning(
    model: nn.Module,
    kept_channels: list[torch.Tensor],
    down_biases: list[torch.Tensor] | None = None,
    down_weights: list[torch.Tensor] | None = None,
) -> None:
    """Slice every block to its kept channels (and any refit down weights); update the config."""
    blocks = decoder_blocks(model)
    with_bias = down_biases is not None or bool(getattr(model.config, "mlp_bias", False))
    for index, (block, kept) in enumerate(zip(blocks, kept_channels, strict=True)):
        bias = down_biases[index] if down_biases is not None else None
        weight = down_weights[index] if down_weights is not None else None
        slice_mlp(block_mlp(block), kept, bias, with_bias=with_bias, down_weight=weight)
    set_config_widths(model.config, [int(k.numel()) for k in kept_channels], with_bias)
