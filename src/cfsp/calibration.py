"""The one block-by-block pass: it moves data, the steps plugged into it do the work.

Inputs to block 0 are captured once (with everything the model passes to its blocks: attention
masks, rotary embeddings, position ids, ...). Then, block by block: the placement onloads the
block's weights; each step ``start``s (registers its hooks on the block); the block runs over every
batch, each step seeing its inputs and outputs (``after_batch``); each step ``finish``es (frees its
per-block state, and may change the block: then the block's outputs are computed again, or the step
hands them over); the placement offloads the block, and its outputs become the next block's inputs.

The pass knows nothing of statistics or pruning: the steps do (``cfsp.statistics`` records what
blocks do to the tokens; ``cfsp.apply`` prunes a block inside a pass). It is the shape of
llm-compressor's sequential pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cfsp.errors import CfspError
from cfsp.memory import peak_memory_text, return_freed_memory
from cfsp.models import decoder_blocks

Call = tuple[tuple, dict]  # the positional and keyword arguments a block receives besides the hidden states


@dataclass
class BlockRun:
    """One block's turn in the pass, as the steps see it."""

    index: int
    block: nn.Module
    inputs: list[torch.Tensor]  # one tensor per batch, on ``store`` if activations are offloaded
    calls: list[Call]
    store: torch.device | None  # where activations wait between blocks (None: where they are made)
    outputs: list[torch.Tensor] = field(default_factory=list)
    hooks: list = field(default_factory=list)  # removed by the pass after the block ran

    def run(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs on ``inputs`` (default: its own), with no step watching."""
        return run_batches(self.block, self.inputs if inputs is None else inputs, self.calls, self.store)


class BlockStep:
    """A plug-in of the pass. Each step owns its state, registers its own hooks and frees what it
    holds per block in ``finish``."""

    def start(self, run: BlockRun) -> None:
        """The block is about to run (its weights are on the device): register hooks in ``run.hooks``."""

    def after_batch(self, run: BlockRun, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """The block ran one batch: ``x_in`` and ``x_out`` on the block's device."""

    def finish(self, run: BlockRun) -> bool | list[torch.Tensor]:
        """The block ran every batch. Return True if the step changed the block so that the next
        block must see its new outputs (the pass runs it again), or the new outputs themselves."""
        return False


def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """Run the model with every block replaced by an identity that records its call; returns
    block 0's hidden states per batch and every block's own calls per batch.

    Blocks of one model may receive different masks or rotary tables (Gemma-3 alternates sliding and
    global attention), so each block's own arguments are kept, not only block 0's.
    """
    blocks = decoder_blocks(model)
    hidden: list[torch.Tensor] = []
    block_calls: list[list[Call]] = [[] for _ in blocks]

    def recorder(index: int) -> Callable:
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                hidden.append(hidden_states.detach())
            block_calls[index].append((args, kwargs))
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
    return hidden, block_calls


class InMemoryBlocks:
    """Where block weights live during a pass: already in memory, so onload and offload do nothing.

    The streamed variant (``cfsp.streaming.StreamedBlocks``) reads a block's weights from
    safetensors files onto the execution device in ``onload`` and frees (or writes) them in
    ``offload``; the pass and the surgery loop are the same for both.
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


def run_block(block: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_batches(
    block: nn.Module,
    inputs: list[torch.Tensor],
    calls: list[Call],
    store: torch.device | None,
    each: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """The block's outputs for every batch (``each(x_in, x_out)`` after each batch).

    With ``store`` (offloaded activations) each batch comes to the block's device just for its
    turn and its output goes back, so the device holds one batch, not all of them.
    """
    device = next(block.parameters()).device
    outputs = []
    for x, call in zip(inputs, calls, strict=True):
        here = x if store is None else x.to(device)
        y = run_block(block, here, call)
        if each is not None:
            each(here, y)
        outputs.append(y if store is None else y.to(store))
    return outputs


def run_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    steps: Sequence[BlockStep],
    *,
    batch_size: int = 8,
    placement: InMemoryBlocks | None = None,
    progress: bool = True,
    description: str = "calibrating blocks",
) -> None:
    """One forward pass per block over ``windows`` [N, L], offering every block to ``steps`` (in
    their order). ``placement`` onloads each block before it runs and offloads it after the steps
    finished, so only one block's weights need be in memory."""
    placement = placement or InMemoryBlocks()
    if windows.ndim != 2 or windows.numel() == 0:
        raise CfspError(
            f"calibration windows must be a non-empty [n, length] tensor, got {tuple(windows.shape)}"
        )
    blocks = decoder_blocks(model)
    hidden, block_calls = capture_block_inputs(model, placement.before_capture(windows), batch_size)
    placement.after_capture()
    store = torch.device("cpu") if placement.offload_activations else None
    inputs = hidden if store is None else [x.to(store) for x in hidden]
    del hidden
    bar = tqdm(total=len(blocks), desc=description, unit="block", disable=not progress)
    started = time.perf_counter()
    with torch.inference_mode():
        for index, block in enumerate(blocks):
            placement.onload(index)
            run = BlockRun(index, block, inputs, block_calls[index], store)
            _block_turn(run, steps)
            placement.offload(index)
            inputs = run.outputs
            block_calls[index] = []
            return_freed_memory()
            rate = windows.numel() * (index + 1) / (time.perf_counter() - started)
            bar.set_postfix_str(f"{rate:,.0f} tok/s, peak {peak_memory_text()}", refresh=False)
            bar.update(1)
    bar.close()


def _block_turn(run: BlockRun, steps: Sequence[BlockStep]) -> None:
    """Start the steps, run the block over every batch with them watching, finish them; leaves
    the outputs the next block receives in ``run.outputs``."""

    def each(x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        for step in steps:
            step.after_batch(run, x_in, x_out)

    try:
        for step in steps:
            step.start(run)
        run.outputs = run_batches(run.block, run.inputs, run.calls, run.store, each)
    finally:
        for hook in run.hooks:
            hook.remove()
        run.hooks.clear()
    rerun = False
    for step in steps:
        changed = step.finish(run)
        if isinstance(changed, list):  # the changed block's outputs, computed by the step
            run.outputs, rerun = changed, False
        elif changed:
            rerun = True
    if rerun:
        run.outputs = run.run()
