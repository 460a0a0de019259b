"""The one block-by-block calibration pass.

Inputs to block 0 are captured once (with everything the model passes to its blocks: attention
masks, rotary embeddings, position ids, ...), then each block runs once over all windows while only
its own inputs and outputs are held. Each block leaves behind a ``BlockStats`` of plain tensors and
sums; nothing here knows about pruning methods.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cfsp import layouts
from cfsp.errors import CfspError
from cfsp.memory import peak_memory_text, return_freed_memory
from cfsp.models import block_mlp, decoder_blocks, statistics_device


@dataclass
class BlockStats:
    """What one block did to the calibration tokens.

    Block-level sums run over every token; channel-level statistics describe the input of
    ``down_proj`` (the intermediate activation), per channel, in float64.
    """

    tokens: int = 0
    windows: int = 0
    angular_sum: float = 0.0  # sum of arccos(cos(x_in, x_out)) / pi
    cosine_sum: float = 0.0  # sum of 1 - cos(x_in, x_out)
    mse_sum: float = 0.0  # sum over tokens of mean squared change
    mae_sum: float = 0.0  # sum over tokens of mean absolute change
    attention_angular_sum: float = 0.0  # sum of arccos(cos(x_in, x_in + attention)) / pi
    mlp_angular_sum: float = 0.0  # sum of arccos(cos(x_in + attention, x_out)) / pi
    sum_sq: torch.Tensor | None = None  # [D] sum over tokens of x_j^2
    sum: torch.Tensor | None = None  # [D] sum over tokens of x_j
    window_sum: list[torch.Tensor] = field(default_factory=list)  # per window: [D] sum of x_j
    window_sum_sq: list[torch.Tensor] = field(default_factory=list)  # per window: [D] sum of x_j^2
    window_tokens: list[int] = field(default_factory=list)
    gram: torch.Tensor | None = None  # [D, D] sum over tokens of x x^T, only with second_moments
    second_moments: bool = False
    keep_windows: bool = False  # per-window sums, which only the reference's FLAP statistic reads
    mlp: MlpRecord | None = None  # the MLP's inputs and outputs, only while the block is being pruned
    heads: BlockStats | None = None  # the same channel statistics of o_proj's input (one per head dim)

    def add_channels(self, act: torch.Tensor) -> None:
        """Record intermediate activations ``act`` [batch, seq, D]; one window per batch row.

        The Gram matrix's products are taken per batch in the activations' precision, at least
        float32 (relative error ~1e-7 against float64, far below any useful refit damping), and
        summed in float64 across batches: float32 products run about twice as fast on CPUs and
        many times faster on GPUs.
        """
        raw = act.detach()
        act = raw.to(statistics_device(act.device), torch.float64)
        per_window_sum = act.sum(dim=1)
        per_window_sq = act.pow(2).sum(dim=1)
        if self.sum is None:
            self.sum = torch.zeros(act.shape[-1], dtype=torch.float64, device=act.device)
            self.sum_sq = torch.zeros_like(self.sum)
        self.sum += per_window_sum.sum(0)
        self.sum_sq += per_window_sq.sum(0)
        if self.second_moments:
            flat = raw.flatten(0, -2)
            part = symmetric_gram(flat if flat.dtype == torch.float64 else flat.float())
            part = part.to(act.device, torch.float64)
            self.gram = part if self.gram is None else self.gram.add_(part)
        if self.keep_windows:
            self.window_sum.extend(per_window_sum.unbind(0))
            self.window_sum_sq.extend(per_window_sq.unbind(0))
            self.window_tokens.extend([act.shape[1]] * act.shape[0])

    def add_block_io(
        self, x_in: torch.Tensor, x_out: torch.Tensor, attention: torch.Tensor | None = None
    ) -> None:
        """Record how far the block moved each token's hidden state, and how far each sublayer
        moved it: ``attention`` is what the attention sublayer added to the residual stream (None:
        the block has none)."""
        device = statistics_device(x_in.device)
        a = x_in.detach().to(device, torch.float64).flatten(0, -2)
        b = x_out.detach().to(device, torch.float64).flatten(0, -2)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
        angular = _angular(cos)
        diff = b - a
        self.angular_sum += angular.sum().item()
        if attention is None:  # a block without attention: the MLP turned the stream alone
            self.mlp_angular_sum += angular.sum().item()
        else:
            middle = a + attention.detach().to(device, torch.float64).flatten(0, -2)
            cos_attention = torch.nn.functional.cosine_similarity(a, middle, dim=-1).clamp(-1.0, 1.0)
            cos_mlp = torch.nn.functional.cosine_similarity(middle, b, dim=-1).clamp(-1.0, 1.0)
            self.attention_angular_sum += _angular(cos_attention).sum().item()
            self.mlp_angular_sum += _angular(cos_mlp).sum().item()
        self.cosine_sum += torch.nan_to_num(1.0 - cos, nan=1.0).sum().item()
        self.mse_sum += diff.pow(2).mean(-1).sum().item()
        self.mae_sum += diff.abs().mean(-1).sum().item()
        self.tokens += a.shape[0]
        self.windows += x_in.shape[0]

    def drop_second_moments(self) -> None:
        """Free the Gram matrices (the block's and its heads') once the block is sliced."""
        self.gram = None
        if self.heads is not None:
            self.heads.gram = None

    def add_tokens(self, act: torch.Tensor) -> None:
        """Record ``act`` [batch, seq, D] as channel statistics that count their own tokens (the
        block's are counted by ``add_block_io``)."""
        self.add_channels(act)
        self.tokens += act.shape[0] * act.shape[1]
        self.windows += act.shape[0]


def _angular(cos: torch.Tensor) -> torch.Tensor:
    """Angular distance arccos(cos) / pi, 0.5 where the cosine is undefined (the reference's rule)."""
    return torch.nan_to_num(torch.arccos(cos) / math.pi, nan=0.5)


@dataclass
class MlpRecord:
    """One block's MLP activations per batch, for reconstructing the pruned MLP.

    ``inputs``, ``outputs`` and ``block_outputs`` come from the stream the block runs on (the pruned
    model's, when earlier blocks are already pruned); ``dense_outputs`` and ``dense_block_outputs``
    from the dense model's own stream, kept beside it (``dense_stream``), else they are the same.
    """

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    dense_outputs: list[torch.Tensor] = field(default_factory=list)
    dense_block_outputs: list[torch.Tensor] = field(default_factory=list)
    first_call: tuple[torch.Tensor, tuple[tuple, dict]] | None = None  # the block's first batch and call


def symmetric_gram(x: torch.Tensor, strips: int = 4) -> torch.Tensor:
    """``x.T @ x`` for ``x`` [T, D], computing only the lower triangle's strips and mirroring them.

    The full product does twice the necessary work; four strips do 5/8 of it, while each strip is
    still one large matrix product (more strips make the products too small to run at full speed).
    """
    width = x.shape[1]
    step = -(-width // strips)
    out = torch.empty(width, width, dtype=x.dtype, device=x.device)
    for start in range(0, width, step):
        stop = min(start + step, width)
        strip = x[:, start:stop].T @ x[:, :stop]
        out[start:stop, :stop] = strip
        out[:start, start:stop] = strip[:, :start].T
    return out


@dataclass
class CapturedInputs:
    """Hidden states entering block 0, and the extra arguments every block receives, per batch."""

    hidden: list[torch.Tensor]
    block_args: list[list[tuple[tuple, dict]]]  # [block][batch] -> (args, kwargs)


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> CapturedInputs:
    """Run the model with every block replaced by an identity that records its call.

    Blocks of one model may receive different masks or rotary tables (Gemma-3 alternates sliding and
    global attention), so each block's own arguments are kept, not only block 0's.
    """
    blocks = decoder_blocks(model)
    hidden: list[torch.Tensor] = []
    block_args: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def recorder(index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                hidden.append(hidden_states.detach())
            block_args[index].append((args, kwargs))
            return hidden_states

        return forward

    # A model dispatched over several devices by accelerate (device_map="auto") has its blocks'
    # forward already wrapped by a hook that moves inputs to the block's device: put it back after.
    wrapped = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = recorder(index)
    device = model.get_input_embeddings().weight.device
    try:
        with torch.inference_mode():
            for batch in windows.split(batch_size):
                model.model(input_ids=batch.to(device), use_cache=False)
    finally:
        for block, forward in zip(blocks, wrapped, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    return CapturedInputs(hidden=hidden, block_args=block_args)


class InMemoryBlocks:
    """Where block weights live during a pass: already in memory, so onload and offload do nothing.

    The streamed variant (``cfsp.streaming.StreamedBlocks``) reads a block's weights from
    safetensors files onto the execution device in ``onload`` and frees (or writes) them in
    ``offload``; the calibration pass and the surgery loop are the same for both.
    """

    writing = False
    streams = False  # True: weights are re-read per pass, so nothing per block should be held
    offload_activations = False  # True: calibration activations wait on the CPU between blocks

    def onload(self, index: int) -> None:
        """Make block ``index``'s weights available on the execution device."""

    def offload(self, index: int) -> None:
        """Block ``index`` is done for this pass (with ``writing``, its final weights are set)."""

    def begin_output(self) -> None:
        """The next pass over the blocks produces the final weights."""

    def before_capture(self, windows: torch.Tensor) -> torch.Tensor:
        """What runs before the blocks (the embeddings) is about to be needed for ``windows``;
        returns the token ids to run it on (a streamed placement may renumber them)."""
        return windows

    def after_capture(self) -> None:
        """Block 0's inputs are captured; what ran before the blocks can go."""


def run_block(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    after_block: Callable[[int, BlockStats], bool | list[torch.Tensor]] | None = None,
    progress: bool = True,
    second_moments: bool = False,
    placement: InMemoryBlocks | None = None,
    window_stats: bool = True,
    record_mlp: bool = False,
    dense_stream: bool = False,
    head_channels: bool = False,
) -> list[BlockStats]:
    """One forward pass per block over ``windows`` [N, L]; returns one ``BlockStats`` per block.

    ``after_block(index, stats)`` may modify the block (sequential pruning); if it returns True the
    block's outputs are recomputed so later blocks see the modified block (or it returns them,
    one tensor per batch, when it can compute them more cheaply). ``second_moments``
    also records each block's D x D Gram matrix of the down_proj input (for the refit; D^2 x 8 bytes
    per block, kept until the caller drops the stats). ``window_stats`` keeps per-window sums (the
    reference's FLAP statistic needs them; ``prune`` asks only then). ``placement`` onloads each block before it
    runs and offloads it after ``after_block``, so only one block's weights need be in memory.
    ``record_mlp`` hands ``after_block`` the block's MLP activations (``stats.mlp``, dropped after
    the call); ``dense_stream`` also runs the still-dense block on the dense model's own stream, kept
    beside the modified one, so that a reconstruction can aim at the dense model's outputs.
    ``head_channels`` also records the input of each attention's o_proj (``stats.heads``, with its
    Gram matrix), from which KV groups are scored and o_proj is refit.
    """
    placement = placement or InMemoryBlocks()
    if windows.ndim != 2 or windows.numel() == 0:
        raise CfspError(
            f"calibration windows must be a non-empty [n, length] tensor, got {tuple(windows.shape)}"
        )
    blocks = decoder_blocks(model)
    captured = capture_block_inputs(model, placement.before_capture(windows), batch_size)
    placement.after_capture()
    store = torch.device("cpu") if placement.offload_activations else None
    inputs = captured.hidden if store is None else [x.to(store) for x in captured.hidden]
    dense_inputs = inputs if dense_stream else None
    all_stats: list[BlockStats] = []
    bar = tqdm(total=len(blocks), desc="calibrating blocks", unit="block", disable=not progress)
    started = time.perf_counter()
    with torch.inference_mode():
        for index, block in enumerate(blocks):
            placement.onload(index)
            calls = captured.block_args[index]
            stats = BlockStats(second_moments=second_moments, keep_windows=window_stats)
            record = MlpRecord() if record_mlp else None
            hooks = [
                layouts.down_projection(block_mlp(block)).register_forward_pre_hook(
                    lambda _module, args, stats=stats: stats.add_channels(args[0])
                )
            ]
            if record is not None:
                hooks.append(_record_mlp(block, record.inputs, record.outputs, store))
            attention: list[torch.Tensor] = []
            if layouts.has_attention(block):
                hooks.append(_record_attention(block, attention))
                attention_module = getattr(block, layouts.ATTENTION)
                if head_channels and layouts.head_shape(attention_module) is not None:
                    stats.heads = BlockStats(second_moments=True)  # small: o_proj's input width
                    hooks.append(
                        attention_module.o_proj.register_forward_pre_hook(
                            lambda _module, args, heads=stats.heads: heads.add_tokens(args[0])
                        )
                    )
            try:
                outputs = _run_batches(block, inputs, calls, store, stats, attention)
            finally:
                for hook in hooks:
                    hook.remove()
            _check_finite(stats, index)
            dense_outputs = outputs
            if record is not None:
                record.block_outputs = outputs
                record.dense_outputs, record.dense_block_outputs = record.outputs, outputs
                if dense_inputs is not None and dense_inputs is not inputs:
                    record.dense_outputs = []
                    hook = _record_mlp(block, [], record.dense_outputs, store)
                    try:
                        dense_outputs = _run_batches(block, dense_inputs, calls, store)
                    finally:
                        hook.remove()
                    record.dense_block_outputs = dense_outputs
                record.first_call = (inputs[0], calls[0])
                stats.mlp = record
            changed = after_block(index, stats) if after_block is not None else False
            if isinstance(changed, list):  # the modified block's outputs, computed by the callback
                outputs = changed
            elif changed:
                outputs = _run_batches(block, inputs, calls, store)
            stats.mlp = None
            placement.offload(index)
            all_stats.append(stats)
            inputs = outputs
            if dense_inputs is not None:
                dense_inputs = dense_outputs
            return_freed_memory()
            rate = windows.numel() * (index + 1) / (time.perf_counter() - started)
            bar.set_postfix_str(f"{rate:,.0f} tok/s, peak {peak_memory_text()}", refresh=False)
            bar.update(1)
    bar.close()
    return all_stats


def _record_mlp(
    block: nn.Module, inputs: list[torch.Tensor], outputs: list[torch.Tensor], store: torch.device | None
):
    """Append the MLP's input and output of every batch to the lists (on ``store`` if given)."""

    def hook(_module, args, out):
        inputs.append(args[0] if store is None else args[0].to(store))
        outputs.append(out if store is None else out.to(store))

    return block_mlp(block).register_forward_hook(hook)


def _record_attention(block: nn.Module, contributions: list[torch.Tensor]):
    """Append what the attention sublayer adds to the residual stream, per batch: its output, or
    its post-norm's where the family has one."""
    module = layouts.post_attention_norm(block) or getattr(block, layouts.ATTENTION)

    def hook(_module, _args, out):
        contributions.append(out[0] if isinstance(out, tuple) else out)

    return module.register_forward_hook(hook)


def _run_batches(
    block: nn.Module,
    inputs: list[torch.Tensor],
    calls: list[tuple[tuple, dict]],
    store: torch.device | None,
    stats: BlockStats | None = None,
    attention: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The block's outputs for every batch (recording how it moved them into ``stats``; with
    ``attention``, filled by a hook, how far each sublayer moved them).

    With ``store`` (offloaded activations) each batch comes to the block's device just for its
    turn and its output goes back, so the device holds one batch, not all of them.
    """
    device = next(block.parameters()).device
    outputs = []
    for x, call in zip(inputs, calls, strict=True):
        here = x if store is None else x.to(device)
        y = run_block(block, here, call)
        if stats is not None:
            stats.add_block_io(here, y, attention.pop() if attention else None)
        outputs.append(y if store is None else y.to(store))
    return outputs


def _check_finite(stats: BlockStats, index: int) -> None:
    """A NaN or inf anywhere in the block's outputs makes the summed squared change non-finite."""
    if not math.isfinite(stats.mse_sum):
        raise CfspError(
            f"NaN or inf in the activations of block {index}; load the model in float32 or bfloat16 "
            "(--dtype float32) instead of float16"
        )
