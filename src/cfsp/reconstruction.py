"""Reconstruction: train a pruned block's MLP to reproduce the dense model's outputs.

The refit re-solves only ``down_proj``, a linear map after the nonlinearity. Reconstruction then
trains the whole pruned MLP (gate, up, down and the bias) by Adam on the calibration tokens, so
that the kept channels' nonlinearity moves too; norms and attention stay frozen. It runs inside the
block-by-block pass, with one block's weights and its activations on the device.

Two choices (``ReconstructConfig``, ``PruneConfig.reconstruct``):

- ``target``: ``mlp`` aims the MLP's output at the dense MLP's output; ``block`` aims
  the block's output at the dense block's output, so the MLP also absorbs how far the residual
  stream entering it has drifted (the same thing when the inputs are dense). ``block`` needs a
  block whose output is ``residual + norm(mlp)``: checked on the first batch, else ``mlp`` is used.
- ``inputs``: ``dense`` trains on the dense model's MLP inputs; ``pruned`` on the
  inputs of the model whose earlier blocks are already pruned and reconstructed, while the target
  stays the dense model's (error-correcting, as GPTQ's sequential mode).

The last ``holdout`` share of the calibration windows is not trained on: it picks the
epoch to keep and stops the training when its loss rises, so the MLP does not memorise the
calibration set. If no epoch beats the refit on the held-out windows, the refit weights stay.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from cfsp import layouts
from cfsp.calibration import run_block
from cfsp.config import ReconstructConfig
from cfsp.models import block_mlp
from cfsp.statistics import MlpRecord

log = logging.getLogger("cfsp")
PATIENCE = 2  # epochs without a better held-out loss before stopping


@dataclass
class BlockReconstruction:
    """What reconstruction did to one block (relative squared error: ``|f(x) - y|^2 / |y|^2``)."""

    block: int
    target: str
    loss_before: float  # on the training windows, with the refit weights
    loss_after: float
    heldout_before: float | None
    heldout_after: float | None
    epochs: int
    kept_refit: bool  # True: no epoch beat the refit, whose weights stay

    def to_dict(self) -> dict:
        return asdict(self)


def reconstruct_mlp(
    block: nn.Module, record: MlpRecord, index: int, config: ReconstructConfig, progress: bool = True
) -> BlockReconstruction:
    """Train ``block``'s (already pruned) MLP on ``record`` as ``config`` says; its parameters
    change in place."""
    target, holdout = config.target, config.holdout
    mlp = block_mlp(block)
    post = layouts.post_mlp_norm(block) if target == "block" else None
    if target == "block" and not _adds_mlp_output(block, mlp, post, record):
        log.warning(
            f"block {index}: its output is not residual + MLP output, so it is reconstructed to the dense "
            "MLP's output instead (reconstruct_target='mlp')"
        )
        target, post = "mlp", None
    device = next(mlp.parameters()).device
    windows = sum(x.shape[0] for x in record.inputs)
    held = min(windows - 1, max(1, round(holdout * windows))) if holdout > 0 and windows > 1 else 0
    with torch.inference_mode(False):
        inputs = _tokens(record.inputs, device)
        targets = _targets(record, target, post, device)
        post_params = _trainable_copy(post, False) if post is not None else None
        split = _window_split(record.inputs, windows - held)
        train = (inputs[:split], targets[:split])
        heldout = (inputs[split:], targets[split:]) if held else None
        params = _trainable_copy(mlp, True)

        def predict(x: torch.Tensor, weights: dict) -> torch.Tensor:
            out = functional_call(mlp, weights, (x,))
            return functional_call(post, post_params, (out,)) if post is not None else out

        before = _relative_error(predict, params, *train)
        held_before = _relative_error(predict, params, *heldout) if heldout else None
        start = before if heldout is None else held_before
        fit = _train(predict, params, train, heldout, start, config, index, progress)
    if fit.best is None:  # never better than the refit: keep it
        return BlockReconstruction(index, target, before, before, held_before, held_before, fit.epochs, True)
    for name, parameter in mlp.named_parameters():
        parameter.copy_(fit.best[name].to(parameter.dtype))
    return BlockReconstruction(
        index,
        target,
        before,
        fit.train_loss,
        held_before,
        fit.watched_loss if heldout else None,
        fit.epochs,
        False,
    )


@dataclass
class _Fit:
    best: dict[str, torch.Tensor] | None  # the parameters of the best epoch, None if none beat the start
    watched_loss: float  # the loss that picked it (held-out, else training)
    train_loss: float
    epochs: int


def _train(
    predict, params, train, heldout, start_loss: float, config: ReconstructConfig, seed: int, progress: bool
) -> _Fit:
    """Adam over shuffled tokens; after each epoch the held-out loss (else the training loss) keeps
    the best parameters, and ``PATIENCE`` epochs without a better held-out loss stop the training."""
    device, epochs, batch_tokens = train[0].device, config.epochs, config.batch_tokens
    steps_per_epoch = math.ceil(train[0].shape[0] / batch_tokens)
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)
    total = max(1, epochs * steps_per_epoch)
    cosine = config.schedule == "cosine"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)) if cosine else 1.0
    )
    generator = torch.Generator().manual_seed(seed)
    fit = _Fit(best=None, watched_loss=start_loss, train_loss=float("nan"), epochs=0)
    worse = 0
    bar = tqdm(
        total=epochs, desc=f"reconstructing block {seed}", unit="epoch", leave=False, disable=not progress
    )
    for _ in range(epochs):
        order = torch.randperm(train[0].shape[0], generator=generator).to(device)
        for first in range(0, order.numel(), batch_tokens):
            rows = order[first : first + batch_tokens]
            y = train[1][rows]
            loss = (predict(train[0][rows], params) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        fit.epochs += 1
        train_loss = _relative_error(predict, params, *train)
        watched = _relative_error(predict, params, *heldout) if heldout else train_loss
        bar.set_postfix_str(f"error {start_loss:.4f} -> {watched:.4f}", refresh=False)
        bar.update(1)
        if watched < fit.watched_loss:
            worse = 0
            fit.best = {name: p.detach().clone() for name, p in params.items()}
            fit.watched_loss, fit.train_loss = watched, train_loss
        else:
            worse += 1
            if heldout and worse >= PATIENCE:
                break
    bar.close()
    return fit


def block_outputs_after(block: nn.Module, record: MlpRecord) -> list[torch.Tensor]:
    """The block's outputs on the recorded batches with its MLP as it is now, without running
    attention again: ``residual + post(mlp(x))``, the residual taken from the recorded run. Only for
    blocks whose output has that form (``_adds_mlp_output``)."""
    mlp, post = block_mlp(block), layouts.post_mlp_norm(block)
    outputs = []
    for x, m, y in zip(record.inputs, record.outputs, record.block_outputs, strict=True):
        device = next(mlp.parameters()).device
        added_before = post(m.to(device)) if post is not None else m.to(device)
        new = mlp(x.to(device))
        added_now = post(new) if post is not None else new
        outputs.append((y.to(device) - added_before + added_now).to(y.device))
    return outputs


def _tokens(batches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Every token's vector [T, H] in float32 on ``device``, as ordinary (trainable-with) tensors."""
    return torch.cat([x.to(device, torch.float32).flatten(0, -2) for x in batches]).clone()


def _window_split(batches: list[torch.Tensor], train_windows: int) -> int:
    """The token row where the first held-out window starts (windows are batches' rows, in order)."""
    length = batches[0].shape[1]
    return train_windows * length


def _targets(record: MlpRecord, target: str, post: nn.Module | None, device: torch.device) -> torch.Tensor:
    """What ``post(mlp(x))`` should equal per token: the dense MLP's output (``mlp``), or the dense
    block's output minus this stream's residual, which the MLP does not change (``block``)."""
    dense = _tokens(record.dense_outputs, device)
    if target == "mlp":
        return dense
    with torch.no_grad():
        mlp_out = _tokens(record.outputs, device)
        added = post(mlp_out.to(_dtype(post))).float() if post is not None else mlp_out
        residual = _tokens(record.block_outputs, device) - added
        return _tokens(record.dense_block_outputs, device) - residual


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _trainable_copy(module: nn.Module, trainable: bool) -> dict[str, torch.Tensor]:
    """float32 copies of ``module``'s parameters that autograd can use (the block's own may be
    inference tensors, made during the calibration pass)."""
    return {
        name: p.detach().clone().to(torch.float32).requires_grad_(trainable)
        for name, p in module.named_parameters()
    }


@torch.no_grad()
def _relative_error(predict, params: dict, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    error = sum(
        (predict(x[i : i + chunk], params) - y[i : i + chunk]).pow(2).sum().item()
        for i in range(0, x.shape[0], chunk)
    )
    return error / max(y.pow(2).sum().item(), 1e-30)


def _adds_mlp_output(block: nn.Module, mlp: nn.Module, post: nn.Module | None, record: MlpRecord) -> bool:
    """Whether the block's output is ``residual + post(mlp output)``: run the first batch with the
    MLP's output replaced by ``m`` and by ``-m``; the outputs must differ by ``post(m) - post(-m)``."""
    hidden, call = record.first_call
    m = record.outputs[0].to(hidden.device)

    def run_with(value: torch.Tensor) -> torch.Tensor:
        handle = mlp.register_forward_hook(lambda _module, _args, _out: value)
        try:
            return run_block(block, hidden, call).float()
        finally:
            handle.remove()

    change = run_with(m) - run_with(-m)
    expected = (post(m) - post(-m)).float() if post is not None else 2 * m.float()
    scale = expected.abs().max().clamp_min(1e-6)
    return bool(((change - expected).abs().max() / scale) < 1e-3)
