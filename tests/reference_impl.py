"""An independent, literal re-implementation of the reference numerics.

It shares no code with cfsp: activations come from forward hooks on a plain dense forward pass
(one window at a time, as the reference runs), statistics are accumulated the reference's way
(running averages over windows, importance summed over tokens, FLAP's in-place recurrence), and
widths and masks follow its rounding and thresholds. It computes in float64 so that comparisons
are not decided by float32 round-off on near-tied channels. Tests compare cfsp against it.
"""

from __future__ import annotations

import math

import torch


def collect(model, windows: torch.Tensor) -> list[dict]:
    """Per block: summed angular distance, S2 running average, FLAP running mean and fluctuation."""
    layers = model.model.layers
    stats = [dict(importance=0.0, s2=None, mean=None, fluct=None, n=0) for _ in layers]
    io: dict[int, tuple] = {}

    def block_hook(index):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            io[index] = (x_in.detach(), x_out.detach())

        return hook

    def down_hook(index):
        def hook(module, args):
            s = stats[index]
            x = args[0].detach().double()[0]  # [tokens, D], one window
            n = s["n"]
            sample = x.pow(2).sum(0)
            s["s2"] = sample / (n + 1) if n == 0 else s["s2"] * n / (n + 1) + sample / (n + 1)
            window_mean = x.mean(0)
            s["mean"] = window_mean / (n + 1) if n == 0 else s["mean"] * n / (n + 1) + window_mean / (n + 1)
            if n == 0:
                s["fluct"] = torch.zeros_like(window_mean)
            else:  # the "old mean" is the running mean, already updated above
                s["fluct"] = s["fluct"] * (n - 1) / n + (x - s["mean"]).pow(2).sum(0) / (n + 1)
            s["n"] = n + 1

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None], use_cache=False)
                for i in range(len(layers)):
                    x_in, x_out = io[i]
                    cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
                    angular = torch.arccos(cos.clamp(-1, 1)) / math.pi
                    angular[torch.isnan(angular)] = 0.5
                    stats[i]["importance"] += angular.sum().item()
    finally:
        for h in handles:
            h.remove()
    return stats


def _weights(layer):
    mlp = layer.mlp
    return (
        mlp.down_proj.weight.detach().double(),
        mlp.up_proj.weight.detach().double().T,
        mlp.gate_proj.weight.detach().double().T,
    )


def cfsp(model, stats, sparsity: float, multiple: int = 128, b: float = 1, c: float = 1):
    """Keep fractions, widths and kept channels of the reference CFSP (cfsp_paper)."""
    values = torch.tensor([s["importance"] for s in stats], dtype=torch.float64)
    s = torch.sigmoid((values - values.mean()) / 1e4)
    avg = s.mean()
    if s.max() / avg * (1 - sparsity) >= 1:
        k = avg * (1 / (1 - sparsity) - 1) / (s.max() - avg) / 1.05
        s = avg + (s - avg) * k
        avg = s.mean()
    keep = (s / avg * (1 - sparsity)).tolist()
    widths, kept = [], []
    for i, layer in enumerate(model.model.layers):
        wd, wu, wg = (w.abs() for w in _weights(layer))
        full = wd.shape[1]
        act = stats[i]["s2"].sqrt()
        wa = wd * act.pow(b)
        score = ((wa / wa.sum(0) + wu / wu.sum(0) + wg / wg.sum(0)) * act.pow(c)).mean(0)
        width = (
            math.floor(full * keep[i] / multiple + 0.5) * multiple
            if multiple > 1
            else int(full * keep[i]) + 1
        )
        if width == 0:
            chosen = torch.arange(full)
        else:
            chosen = torch.nonzero(score >= score.sort(descending=True).values[width - 1]).flatten()
        widths.append(width)
        kept.append(chosen)
    return keep, widths, kept


def _global(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    standard = [(s - s.mean()) / s.std() for s in scores]
    flat = torch.cat(standard).sort(descending=True).values
    threshold = flat[int(flat.numel() * (1 - sparsity))]
    return [torch.nonzero(s > threshold).flatten() for s in standard]


def wanda_sp(model, stats, sparsity: float) -> list[torch.Tensor]:
    scores = [
        (_weights(layer)[0].abs() * stats[i]["s2"].sqrt()).mean(0)
        for i, layer in enumerate(model.model.layers)
    ]
    return _global(scores, sparsity)


def flap(model, stats, sparsity: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Kept channels and the down_proj compensation biases of the reference FLAP."""
    layers = model.model.layers
    scores = [stats[i]["fluct"] * _weights(layer)[0].pow(2).sum(0) for i, layer in enumerate(layers)]
    kept = _global(scores, sparsity)
    biases = []
    for i, layer in enumerate(layers):
        wd = _weights(layer)[0]
        pruned = torch.ones(wd.shape[1], dtype=torch.bool)
        pruned[kept[i]] = False
        biases.append(wd[:, pruned] @ stats[i]["mean"][pruned])
    return kept, biases


def magnitude_sp(model, sparsity: float) -> list[torch.Tensor]:
    kept = []
    for layer in model.model.layers:
        score = _weights(layer)[0].norm(dim=0)
        threshold = score.sort().values[int(score.numel() * sparsity)]
        kept.append(torch.nonzero(score >= threshold).flatten())
    return kept
