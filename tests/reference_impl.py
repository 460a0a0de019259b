"""An independent, literal re-implementation of the reference CFSP numerics (CFSP.md sections 1-5).

It shares no code with cfsp: activations come from forward hooks on a plain dense forward pass
(one window at a time, as the reference runs), statistics are accumulated the reference's way in
float32 (running averages, importance summed over tokens), and widths and masks follow its
rounding and ``>=`` threshold. Tests compare cfsp's kept channels against it.
"""

from __future__ import annotations

import math

import torch


def reference_cfsp(
    model, windows: torch.Tensor, sparsity: float, multiple: int = 128, b: float = 1, c: float = 1
):
    """Return (keep fractions, widths, kept channel indices per block) as the reference computes them."""
    layers = model.model.layers
    n_blocks = len(layers)
    importance = [0.0] * n_blocks
    s2 = [None] * n_blocks
    seen = [0] * n_blocks
    io: dict[int, tuple] = {}

    def block_hook(index):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            io[index] = (x_in.detach(), x_out.detach())

        return hook

    def down_hook(index):
        def hook(module, args):
            x = args[0].detach().float()
            sample = x.pow(2).sum(dim=(0, 1))  # per-sample sum of squares
            n = seen[index]
            s2[index] = sample / (n + 1) if n == 0 else s2[index] * n / (n + 1) + sample / (n + 1)
            seen[index] = n + 1

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None], use_cache=False)
                for i in range(n_blocks):
                    x_in, x_out = io[i]
                    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
                    angular = torch.arccos(cos.clamp(-1, 1)) / math.pi
                    angular[torch.isnan(angular)] = 0.5
                    importance[i] += angular.sum().item()
    finally:
        for h in handles:
            h.remove()

    values = torch.tensor(importance, dtype=torch.float64)
    s = torch.sigmoid((values - values.mean()) / 1e4)
    avg = s.mean()
    if s.max() / avg * (1 - sparsity) >= 1:
        k = avg * (1 / (1 - sparsity) - 1) / (s.max() - avg) / 1.05
        s = avg + (s - avg) * k
        avg = s.mean()
    keep = (s / avg * (1 - sparsity)).tolist()

    widths, kept = [], []
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        full = mlp.down_proj.in_features
        act = s2[i].sqrt()
        wd = mlp.down_proj.weight.detach().float().abs()
        wu = mlp.up_proj.weight.detach().float().T.abs()
        wg = mlp.gate_proj.weight.detach().float().T.abs()
        wa = wd * act.pow(b)
        m = (wa / wa.sum(0) + wu / wu.sum(0) + wg / wg.sum(0)) * act.pow(c)
        score = m.mean(0)
        if multiple > 1:
            width = math.floor(full * keep[i] / multiple + 0.5) * multiple
        else:
            width = int(full * keep[i]) + 1
        if width == 0:
            chosen = torch.arange(full)
        else:
            threshold = score.sort(descending=True).values[width - 1]
            chosen = torch.nonzero(score >= threshold).flatten()
        widths.append(width)
        kept.append(chosen)
    return keep, widths, kept
