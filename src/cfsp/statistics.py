"""What blocks do to the calibration tokens: the statistic steps of the block pass.

Each step records one thing into the block's ``BlockStats`` (one per block, shared by the steps
of a pass) and frees what it held for the block when the block is done:

- ``BlockMovement``: how far the block, and each of its sublayers, turns the residual stream
  (the coarse, block-level importance; the attention sublayer importance);
- ``MlpChannels``: per-channel sums of down_proj's input (the fine, channel-level scores), and
  optionally its Gram matrix (the refit);
- ``HeadChannels``: the same of o_proj's input (KV-group scores and the o_proj refit);
- ``MlpRecorder``: the MLP's inputs and outputs per batch (reconstruction);
- ``ExpertRouting``: what the router of a mixture-of-experts block did, per routed expert
  (how often it chose each expert, with what weight, and how large each expert's output was).

``calibrate`` runs the pass with the statistic steps every pruning method reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from cfsp import layouts
from cfsp.calibration import BlockRun, BlockStep, InMemoryBlocks, run_blocks
from cfsp.errors import CfspError
from cfsp.experts import down_columns, expert_intermediate, find_moe
from cfsp.models import block_mlp, decoder_blocks, statistics_device


@dataclass
class BlockStats:
    """What one block did to the calibration tokens.

    Block-level sums run over every token; channel-level statistics describe the input of
    ``down_proj`` (the intermediate activation), per channel, in float64. ``gram`` is the sum of
    ``x x^T``: float64 while it is summed, then held as the upper triangle rounded to float32
    (half of a float32 matrix, a quarter of a float64 one; relative error ~6e-8, far below any
    useful refit damping), and handed out as a float64 matrix.
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
    gram_sum: torch.Tensor | None = None  # [D, D] float64 while being summed
    packed_gram: torch.Tensor | None = None  # its upper triangle, row by row, in float32, once summed
    mlp: MlpRecord | None = None  # the MLP's inputs and outputs, only while the block is being pruned
    heads: BlockStats | None = None  # the same channel statistics of o_proj's input (one per head dim)
    experts: ExpertStats | None = None  # the routing statistics of a mixture-of-experts block

    @property
    def gram(self) -> torch.Tensor | None:
        """The Gram matrix (float64) if it was recorded and is still held."""
        if self.gram_sum is not None:
            return self.gram_sum
        return None if self.packed_gram is None else unpack_symmetric(self.packed_gram, self.sum.numel())

    @property
    def has_gram(self) -> bool:
        return self.gram_sum is not None or self.packed_gram is not None

    def seal_gram(self) -> None:
        """The block is done: keep the Gram matrix in its compact form."""
        if self.gram_sum is not None:
            self.packed_gram = pack_symmetric(self.gram_sum)
            self.gram_sum = None

    @property
    def gram_bytes(self) -> int:
        return 0 if self.packed_gram is None else self.packed_gram.numel() * self.packed_gram.element_size()

    def add_channels(self, act: torch.Tensor, second_moments: bool = False, per_window: bool = False) -> None:
        """Record intermediate activations ``act`` [batch, seq, D]; one window per batch row.

        The Gram matrix's products are taken per batch in the activations' precision, at least
        float32, and summed in float64 across batches: float32 products run about twice as fast on
        CPUs and many times faster on GPUs.
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
        if second_moments:
            flat = raw.flatten(0, -2)
            part = symmetric_gram(flat if flat.dtype == torch.float64 else flat.float())
            part = part.to(act.device, torch.float64)
            self.gram_sum = part if self.gram_sum is None else self.gram_sum.add_(part)
        if per_window:
            self.window_sum.extend(per_window_sum.unbind(0))
            self.window_sum_sq.extend(per_window_sq.unbind(0))
            self.window_tokens.extend([act.shape[1]] * act.shape[0])

    def add_tokens(self, act: torch.Tensor, second_moments: bool = False) -> None:
        """Record ``act`` [batch, seq, D] as channel statistics that count their own tokens (the
        block's are counted by ``add_block_io``)."""
        self.add_channels(act, second_moments)
        self.tokens += act.shape[0] * act.shape[1]
        self.windows += act.shape[0]

    def add_block_io(
        self, x_in: torch.Tensor, x_out: torch.Tensor, attention: torch.Tensor | None = None
    ) -> None:
        """Record how far the block moved each token's hidden state, and how far each sublayer
        moved it: ``attention`` is what the attention sublayer added to the residual stream (None:
        the block has none)."""
        device = statistics_device(x_in.device)
        before = x_in.detach().to(device, torch.float64).flatten(0, -2)
        after = x_out.detach().to(device, torch.float64).flatten(0, -2)
        cos = torch.nn.functional.cosine_similarity(before, after, dim=-1).clamp(-1.0, 1.0)
        angular = _angular(cos)
        diff = after - before
        self.angular_sum += angular.sum().item()
        if attention is None:  # a block without attention: the MLP turned the stream alone
            self.mlp_angular_sum += angular.sum().item()
        else:
            middle = before + attention.detach().to(device, torch.float64).flatten(0, -2)
            cos_attention = torch.nn.functional.cosine_similarity(before, middle, dim=-1).clamp(-1.0, 1.0)
            cos_mlp = torch.nn.functional.cosine_similarity(middle, after, dim=-1).clamp(-1.0, 1.0)
            self.attention_angular_sum += _angular(cos_attention).sum().item()
            self.mlp_angular_sum += _angular(cos_mlp).sum().item()
        self.cosine_sum += torch.nan_to_num(1.0 - cos, nan=1.0).sum().item()
        self.mse_sum += diff.pow(2).mean(-1).sum().item()
        self.mae_sum += diff.abs().mean(-1).sum().item()
        self.tokens += before.shape[0]
        self.windows += x_in.shape[0]

    def drop_second_moments(self) -> None:
        """Free the Gram matrices (the block's and its heads') once the block is sliced."""
        self.gram_sum = self.packed_gram = None
        if self.heads is not None:
            self.heads.gram_sum = self.heads.packed_gram = None


def _angular(cos: torch.Tensor) -> torch.Tensor:
    """Angular distance arccos(cos) / pi, 0.5 where the cosine is undefined (the reference's rule)."""
    return torch.nan_to_num(torch.arccos(cos) / math.pi, nan=0.5)


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric [D, D] matrix, row by row, as one float32 vector."""
    size = matrix.shape[0]
    out = torch.empty(size * (size + 1) // 2, dtype=torch.float32, device=matrix.device)
    start = 0
    for row in range(size):
        out[start : start + size - row] = matrix[row, row:]
        start += size - row
    return out


def unpack_symmetric(packed: torch.Tensor, size: int) -> torch.Tensor:
    """The float64 [D, D] matrix ``pack_symmetric`` packed."""
    out = torch.empty(size, size, dtype=torch.float64, device=packed.device)
    start = 0
    for row in range(size):
        values = packed[start : start + size - row]
        out[row, row:] = values
        out[row:, row] = values
        start += size - row
    return out


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


@dataclass
class ExpertStats:
    """What the router did with one MoE block's calibration tokens, per routed expert, in float64.

    A token routed to ``k`` experts counts once for each. ``saliency_sum`` is the sum, over the
    tokens routed to an expert, of the routing weight times the L2 norm of the expert's own
    (unweighted) output: REAP's saliency is its mean over those tokens.
    """

    routed: torch.Tensor  # [E] tokens routed to each expert
    gate_mass: torch.Tensor  # [E] sum of the routing weights it received
    saliency_sum: torch.Tensor  # [E] sum of routing weight x ||expert output||
    tokens: int = 0  # tokens that reached the router
    # With channels: [E, I] sum over the expert's tokens of (routing weight x intermediate activation)^2,
    # and the norms of the down projection's columns (taken while the weights are on the device).
    channel_energy: torch.Tensor | None = None
    down_norms: torch.Tensor | None = None

    @classmethod
    def empty(cls, count: int, device: torch.device, width: int | None = None) -> ExpertStats:
        zeros = torch.zeros(count, dtype=torch.float64, device=device)
        channels = None if width is None else torch.zeros(count, width, dtype=torch.float64, device=device)
        return cls(zeros.clone(), zeros.clone(), zeros.clone(), channel_energy=channels)

    @property
    def unrouted(self) -> int:
        """Experts the calibration never routed a token to."""
        return int((self.routed == 0).sum())

    def add(
        self, experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """One batch: ``hidden`` [T, H] as the experts received it, ``index`` [T, k] the chosen experts,
        ``weights`` [T, k] (or [T, E]) their routing weights. Each expert's unweighted output comes
        from the experts module itself (one extra evaluation per routed slot, in chunks), so every
        family's activation, clamp and bias count as the model computes them."""
        count = self.routed.numel()
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        if weights.shape[-1] == count and index.shape[-1] != count:
            weights = weights.reshape(hidden.shape[0], -1).gather(1, index)
        weights = weights.reshape(index.shape)
        self.tokens += hidden.shape[0]
        slots = torch.arange(hidden.shape[0], device=index.device).repeat_interleave(index.shape[1])
        chosen, weight = index.reshape(-1), weights.reshape(-1)
        valid = (chosen >= 0) & (chosen < count)  # some kernels mark dropped slots with E
        slots, chosen, weight = slots[valid], chosen[valid], weight[valid]
        device = self.routed.device
        where = chosen.to(device)
        self.routed.index_add_(0, where, torch.ones_like(where, dtype=torch.float64))
        self.gate_mass.index_add_(0, where, weight.to(device, torch.float64))
        step = max(1, EXPERT_ROWS_PER_CHUNK)
        for start in range(0, chosen.numel(), step):
            rows = slots[start : start + step]
            ids = chosen[start : start + step]
            ones = torch.ones(ids.numel(), 1, dtype=weights.dtype, device=weights.device)
            out = experts(hidden[rows], ids.view(-1, 1), ones)
            norms = out.to(torch.float64).norm(dim=-1)
            self.saliency_sum.index_add_(
                0, ids.to(device), (norms * weight[start : start + step].to(torch.float64)).to(device)
            )
        if self.channel_energy is not None:
            for expert in torch.unique(chosen).tolist():
                mine = chosen == expert
                act = expert_intermediate(experts, hidden[slots[mine]], expert).to(torch.float64)
                act = act * weight[mine].to(torch.float64).unsqueeze(1)
                self.channel_energy[expert] += act.pow(2).sum(dim=0).to(device)


EXPERT_ROWS_PER_CHUNK = 8192  # routed slots evaluated at once for the expert output norms


# ---------------------------------------------------------------------------------------------
# The steps.


class BlockMovement(BlockStep):
    """How far each block (and each of its sublayers) moves the residual stream: the angular
    importance and its alternatives (cosine, mse, mae), per block."""

    def __init__(self, records: list[BlockStats]) -> None:
        self.records = records
        self.attention: list[torch.Tensor] = []

    def start(self, run: BlockRun) -> None:
        if not layouts.has_attention(run.block):
            return
        # What the attention sublayer adds to the residual stream: its output, or its post-norm's
        module = layouts.post_attention_norm(run.block) or getattr(run.block, layouts.ATTENTION)
        sink = self.attention

        def hook(_module, _args, out):
            sink.append(out[0] if isinstance(out, tuple) else out)

        run.hooks.append(module.register_forward_hook(hook))

    def after_batch(self, run: BlockRun, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        self.records[run.index].add_block_io(x_in, x_out, self.attention.pop() if self.attention else None)

    def finish(self, run: BlockRun) -> bool:
        self.attention.clear()
        # A NaN or inf anywhere in the block's outputs makes the summed squared change non-finite.
        if not math.isfinite(self.records[run.index].mse_sum):
            raise CfspError(
                f"NaN or inf in the activations of block {run.index}; if the model runs in float16, load it in "
                "float32 or bfloat16 (--dtype float32); if it already does, its weights hold NaN or inf"
            )
        return False


class MlpChannels(BlockStep):
    """Per-channel sums of down_proj's input; with ``second_moments`` its Gram matrix (sealed into
    its compact form when the block is done); with ``per_window`` per-window sums (only the
    reference's FLAP statistic reads them)."""

    def __init__(self, records: list[BlockStats], second_moments: bool = False, per_window: bool = False):
        self.records, self.second_moments, self.per_window = records, second_moments, per_window

    def start(self, run: BlockRun) -> None:
        record, moments, windows = self.records[run.index], self.second_moments, self.per_window
        down = layouts.down_projection(block_mlp(run.block))
        run.hooks.append(
            down.register_forward_pre_hook(lambda _m, args: record.add_channels(args[0], moments, windows))
        )

    def finish(self, run: BlockRun) -> bool:
        self.records[run.index].seal_gram()
        return False


class HeadChannels(BlockStep):
    """The channel statistics and Gram matrix of o_proj's input (``BlockStats.heads``), in blocks
    whose attention has separate q/k/v/o projections."""

    def __init__(self, records: list[BlockStats]) -> None:
        self.records = records

    def start(self, run: BlockRun) -> None:
        if not layouts.has_attention(run.block):
            return
        attention = getattr(run.block, layouts.ATTENTION)
        if layouts.head_shape(attention) is None:
            return
        heads = self.records[run.index].heads = BlockStats()  # small: o_proj's input width
        run.hooks.append(
            attention.o_proj.register_forward_pre_hook(lambda _m, args: heads.add_tokens(args[0], True))
        )

    def finish(self, run: BlockRun) -> bool:
        heads = self.records[run.index].heads
        if heads is not None:
            heads.seal_gram()
        return False


class MlpRecorder(BlockStep):
    """The MLP's inputs and outputs per batch (``BlockStats.mlp``), for reconstruction; freed by the
    step that uses them. With ``dense_stream`` the still-dense block also runs on the dense model's
    own stream, which this step keeps beside the pass's, so that a reconstruction can aim at the
    dense model's outputs while the pass carries the pruned model's."""

    def __init__(self, records: list[BlockStats], dense_stream: bool = False) -> None:
        self.records, self.dense_stream = records, dense_stream
        self.dense_inputs: list[torch.Tensor] | None = None

    def start(self, run: BlockRun) -> None:
        record = self.records[run.index].mlp = MlpRecord()
        record.first_call = (run.inputs[0], run.calls[0])
        run.hooks.append(self._record(run, record.inputs, record.outputs))

    def finish(self, run: BlockRun) -> bool:
        """Runs before any step that changes the block (steps finish in order)."""
        record = self.records[run.index].mlp
        record.block_outputs = run.outputs
        record.dense_outputs, record.dense_block_outputs = record.outputs, run.outputs
        if self.dense_stream:
            if self.dense_inputs is not None and self.dense_inputs is not run.inputs:
                record.dense_outputs = []
                hook = self._record(run, None, record.dense_outputs)
                try:
                    record.dense_block_outputs = run.run(self.dense_inputs)
                finally:
                    hook.remove()
            self.dense_inputs = record.dense_block_outputs
        return False

    @staticmethod
    def _record(run: BlockRun, inputs: list | None, outputs: list):
        store = run.store

        def hook(_module, args, out):
            if inputs is not None:
                inputs.append(args[0] if store is None else args[0].to(store))
            outputs.append(out if store is None else out.to(store))

        return block_mlp(run.block).register_forward_hook(hook)


class ExpertRouting(BlockStep):
    """Routing statistics of each mixture-of-experts block (``ExpertStats``), from the experts
    module's own inputs: the tokens, the experts the router chose and their weights; with
    ``channels``, also each expert's intermediate channels over the tokens routed to it."""

    def __init__(self, records: list[BlockStats], channels: bool = False) -> None:
        self.records, self.channels = records, channels

    def start(self, run: BlockRun) -> None:
        moe = find_moe(run.block)
        if moe is None:
            return
        record = self.records[run.index]
        device = statistics_device(moe.experts.down_proj.device)
        record.experts = ExpertStats.empty(moe.count, device, moe.width if self.channels else None)
        busy = False

        def hook(module, args, kwargs, _out):
            nonlocal busy
            if busy:  # the step's own calls of the experts module
                return
            hidden, index, weights = [*args, *kwargs.values()][:3]
            busy = True
            try:
                with torch.no_grad():
                    record.experts.add(module, hidden, index, weights)
            finally:
                busy = False

        run.hooks.append(moe.experts.register_forward_hook(hook, with_kwargs=True))

    def finish(self, run: BlockRun) -> bool:
        moe, stats = find_moe(run.block), self.records[run.index].experts
        if moe is not None and stats.channel_energy is not None:
            stats.down_norms = (
                down_columns(moe.experts)
                .detach()
                .to(torch.float64)
                .norm(dim=1)
                .to(stats.channel_energy.device)
            )
        return False


def statistic_steps(
    records: list[BlockStats], second_moments: bool = False, heads: bool = False, per_window: bool = False
) -> list[BlockStep]:
    """The steps that fill ``records``: block movement, down_proj input channels (with the Gram
    matrix if ``second_moments``), and o_proj input channels if ``heads``."""
    steps: list[BlockStep] = [BlockMovement(records), MlpChannels(records, second_moments, per_window)]
    return steps + [HeadChannels(records)] * heads


def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    *,
    second_moments: bool = False,
    heads: bool = False,
    per_window: bool = True,
    placement: InMemoryBlocks | None = None,
    progress: bool = True,
) -> list[BlockStats]:
    """The statistics every pruning method reads, from one pass over ``windows`` [N, L]: one
    ``BlockStats`` per block (with ``second_moments``, each block's Gram matrix; with ``heads``, the
    statistics of o_proj's input)."""
    records = [BlockStats() for _ in decoder_blocks(model)]
    steps = statistic_steps(records, second_moments, heads, per_window)
    run_blocks(model, windows, steps, batch_size=batch_size, placement=placement, progress=progress)
    return records
