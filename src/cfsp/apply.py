"""*apply*: carry out a ``Plan``: surgery and compensation (or reconstruction), block by block.

``BlockSurgery.prune_block`` is the one place a block is pruned: its compensation (the refit, the
mean bias, or a saved plan's bias), the refit of o_proj for cut KV groups, the slicing of its MLP
and attention, and the reconstruction of its MLP. ``apply`` runs it over the blocks in one of two
ways, in memory or streamed alike:

- a plain loop over the blocks, when the plan needs no activations any more (the Gram matrices
  were held from the calibration pass, or the compensation needs none);
- inside a second pass over the calibration windows (``PruneBlocks``, a step of the block pass),
  which records each block's statistics just before the block is pruned: the refit with one Gram
  matrix in memory at a time, ``sequential`` (channels re-chosen on the pruned model's
  activations) and ``reconstruct`` (the MLP trained on its recorded activations).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cfsp import layouts
from cfsp.allocation import top_channels
from cfsp.calibration import BlockRun, BlockStep, InMemoryBlocks, run_blocks
from cfsp.compensation import Compensation, compensate, refit_out_projection
from cfsp.errors import CfspError
from cfsp.memory import return_freed_memory
from cfsp.models import block_mlp, count_parameters, decoder_blocks
from cfsp.moe import apply_experts
from cfsp.plan import Plan
from cfsp.reconstruction import block_outputs_after, reconstruct_mlp
from cfsp.scoring import block_scores
from cfsp.statistics import BlockStats, MlpRecorder, statistic_steps
from cfsp.surgery import AttentionCut, needs_bias, set_config_widths, slice_mlp

log = logging.getLogger("cfsp")


class BlockSurgery:
    """Prunes blocks as a plan says; collects the biases it adds and the reconstruction reports."""

    def __init__(self, model: nn.Module, plan: Plan, keep_statistics: bool = False, progress: bool = True):
        self.plan, self.config, self.progress = plan, plan.config, progress
        self.rule = plan.compensation_rule or "none"  # "plan": the plan's own biases (a replay)
        self.keep_statistics = keep_statistics  # statistics the caller reuses: their Gram matrices stay
        self.kept = list(plan.kept_channels)
        if self.rule == "plan":
            adds_bias = plan.down_biases is not None
        else:  # the mean bias, and the refit's intercept (a uniform, stock output refits without one)
            adds_bias = self.rule == "mean" or (self.rule == "refit" and not self.config.uniform)
        self.with_bias = needs_bias(model, adds_bias)
        self.biases: list[torch.Tensor] | None = [] if adds_bias else None
        self.reports: list[dict] = []
        self.attention_cut = attention_cut(model, plan)

    def prune_block(
        self, index: int, block: nn.Module, stats: BlockStats | None
    ) -> bool | list[torch.Tensor]:
        """Prune block ``index`` (its dense weights on the device, ``stats`` its statistics); returns
        whether the next block must see its new outputs, or those outputs."""
        config, mlp = self.config, block_mlp(block)
        full = layouts.mlp_width(mlp)
        if config.sequential and stats is not None:
            self.kept[index] = top_channels(block_scores(mlp, stats, config).cpu(), self.plan.widths[index])
        compensation = self._compensation(index, block, stats)
        if self.biases is not None:
            self.biases.append(compensation.bias)
        if stats is not None and not self.keep_statistics:
            stats.drop_second_moments()  # D x D: free it as soon as the block is done
        slice_mlp(
            mlp,
            self.kept[index],
            compensation.bias,
            with_bias=self.with_bias,
            down_weight=compensation.weight,
        )
        self.attention_cut.apply(index, block, compensation.out_weight)
        if config.reconstructs and stats is not None and self.kept[index].numel() < full:
            report = reconstruct_mlp(block, stats.mlp, index, config.reconstruct, self.progress)
            self.reports.append(report.to_dict())
            if config.reconstruct.inputs == "pruned" and report.target == "block":
                return block_outputs_after(block, stats.mlp)  # output = residual + MLP: no rerun needed
        # True: the next block sees this block's pruned output (else the dense one, as planned)
        return config.sequential or (config.reconstructs and config.reconstruct.inputs == "pruned")

    def _compensation(self, index: int, block: nn.Module, stats: BlockStats | None) -> Compensation:
        if self.rule == "plan":
            biases = self.plan.down_biases
            return Compensation(bias=None if biases is None else biases[index])
        down = layouts.down_projection(block_mlp(block)).weight
        result = compensate(
            self.rule, down, self.kept[index], stats, self.config.refit_damping, not self.config.uniform
        )
        if self.rule == "refit":
            result.out_weight = self._refit_out(index, block, stats)
        return result

    def _refit_out(self, index: int, block: nn.Module, stats: BlockStats | None) -> torch.Tensor | None:
        """The refit o_proj of a block whose KV groups are cut (None: not cut, or no refit possible)."""
        groups = self.attention_cut.kept_groups
        if groups is None or groups[index] is None or index in self.attention_cut.dropped:
            return None
        if stats is None or stats.heads is None:
            return None
        columns = layouts.group_rows(self.attention_cut.heads, groups[index], query=True)
        out = getattr(block, layouts.ATTENTION).o_proj.weight
        return refit_out_projection(out, columns, stats.heads, self.config.refit_damping)

    def finish(self, model: nn.Module) -> None:
        """Every block is pruned: the config records the widths and the attention cuts."""
        set_config_widths(
            model.config, [int(k.numel()) for k in self.kept], self.with_bias, self.config.uniform
        )
        self.attention_cut.record(model.config)


class PruneBlocks(BlockStep):
    """The surgery as a step of a block pass: prunes each block once its statistics are recorded."""

    def __init__(self, surgery: BlockSurgery, records: list[BlockStats]) -> None:
        self.surgery, self.records = surgery, records

    def finish(self, run: BlockRun) -> bool | list[torch.Tensor]:
        record = self.records[run.index]
        changed = self.surgery.prune_block(run.index, run.block, record)
        record.mlp = None  # the recorded activations and second moments go with the block
        record.drop_second_moments()
        return changed


def attention_cut(model: nn.Module, plan: Plan) -> AttentionCut:
    """The plan's dropped attention sublayers and kept KV groups, with the head counts they leave."""
    planned = AttentionCut(dropped=list(plan.dropped_attention))
    groups = plan.kept_kv_groups
    if groups is None:
        return planned
    planned.kept_groups = list(groups)
    index, kept = next((i, g) for i, g in enumerate(groups) if g is not None)
    shape = layouts.head_shape(getattr(decoder_blocks(model)[index], layouts.ATTENTION))
    if shape is None or int(kept.max()) >= shape.kv_heads:
        raise CfspError(
            "the plan keeps KV groups this model does not have; apply it to the model it was made from"
        )
    planned.heads = shape.keeping(len(kept))
    return planned


def apply(
    model: nn.Module,
    plan: Plan,
    *,
    stats: list[BlockStats | None] | None = None,
    calib: torch.Tensor | None = None,
    placement: InMemoryBlocks | None = None,
    keep_statistics: bool = False,
    progress: bool = True,
) -> Plan:
    """Prune ``model`` in place as ``plan`` says; fills the plan's biases, reconstruction reports
    and parameter count. ``stats`` are the statistics the plan was made from (needed by the refit
    when it holds the Gram matrices, and by the mean bias); without them, a compensation that needs
    activations runs a second pass over ``calib``."""
    placement = placement or InMemoryBlocks()
    if plan.kept_experts is not None:
        return apply_experts(model, plan, placement)
    config = plan.config
    surgery = BlockSurgery(model, plan, keep_statistics, progress)
    blocks = decoder_blocks(model)
    stats = stats if stats is not None else [None] * len(blocks)
    refit = surgery.rule == "refit"
    second_pass = (
        config.sequential
        or config.reconstructs
        or (refit and not all(s is not None and s.has_gram for s in stats))
    )
    placement.begin_output()
    if second_pass:
        if calib is None:
            raise CfspError(
                f"compensation {config.compensation!r} takes a second pass over the calibration windows: "
                "pass calib beside stats"
            )
        records = [BlockStats() for _ in blocks]
        steps = statistic_steps(
            records, refit, refit and surgery.attention_cut.heads is not None, config.needs_window_stats
        )
        if config.reconstructs:
            dense_stream = config.reconstruct.inputs == "pruned" or config.sequential
            steps.append(MlpRecorder(records, dense_stream))
        steps.append(PruneBlocks(surgery, records))
        run_blocks(
            model,
            calib,
            steps,
            batch_size=config.batch_size,
            placement=placement,
            progress=progress,
            description="pruning blocks",
        )
    else:
        for index, block in enumerate(blocks):
            placement.onload(index)
            surgery.prune_block(index, block, stats[index])
            placement.offload(index)
            return_freed_memory()
    surgery.finish(model)
    plan.kept_channels = surgery.kept
    plan.widths = [int(k.numel()) for k in surgery.kept]
    if surgery.biases is not None and plan.compensation_rule != "plan":
        plan.down_biases = surgery.biases
    if config.reconstructs:
        plan.reconstruction = surgery.reports
        _log_reconstruction(surgery.reports)
    plan.params_after = count_parameters(model)
    return plan


def _log_reconstruction(reports: list[dict]) -> None:
    if not reports:
        return
    key = "heldout" if reports[0]["heldout_before"] is not None else "loss"
    before = sum(r[f"{key}_before"] for r in reports) / len(reports)
    after = sum(r[f"{key}_after"] for r in reports) / len(reports)
    kept_refit = sum(r["kept_refit"] for r in reports)
    log.info(
        f"reconstructed {len(reports)} MLPs: mean relative error {before:.4f} -> {after:.4f}"
        f"{' (held-out windows)' if key == 'heldout' else ''}; {kept_refit} kept the refit"
    )
