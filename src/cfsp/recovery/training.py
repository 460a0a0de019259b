"""The recovery training loop: one process or many (DDP / FSDP2), checkpoints, resume, the result.

A plain loop over PyTorch's own pieces, in the manner of nanoGPT: AdamW, a transformers learning-rate
schedule, gradient accumulation, clipping, bf16, gradient checkpointing, and the distributed
engines of ``distributed``. Each step takes its examples from the one global order of ``batches``,
and its loss is the sum of token losses divided by the token count of the whole step over all
processes, so that the loss curve and the weights do not depend on how many processes share the
work. Rank 0 shows progress (tokens/s, time left), logs and returns the merged model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfsp.errors import CfspError
from cfsp.outdir import StagedOutput, check_output
from cfsp.recovery.batches import global_examples, held_out_batches, rank_batches
from cfsp.recovery.checkpoints import (
    check_checkpoint_ranks,
    load_checkpoint,
    lora_record,
    read_state,
    resume_checkpoint,
    save_checkpoint,
)
from cfsp.recovery.config import RecoveryConfig
from cfsp.recovery.data import PadCollator, RecoveryDataset, load_recovery_data, pad_id
from cfsp.recovery.distillation import RecoveryLoss, token_counts
from cfsp.recovery.distributed import Cluster, skip_gradient_sync, wrap
from cfsp.recovery.ranks import plan_ranks
from cfsp.recovery.stream import TextStream
from cfsp.recovery.trainable import (
    attach_lora,
    build_lora_config,
    count_trainable,
    merge_lora,
    train_block_weights,
)

log = logging.getLogger("cfsp")


@dataclass
class RecoveryResult:
    """What recovery produced: the plain (merged) model and how it was trained."""

    model: nn.Module | None  # None on every process but rank 0
    ranks: list[int]
    trainable_params: int
    uniform_params: int
    allocation: str
    steps: int
    train: str = "lora"
    tokens_seen: int = 0  # non-padding input tokens of every optimizer step, resumed steps included
    start_step: int = 0
    final_loss: float | None = None
    train_loss: float | None = None
    train_seconds: float | None = None  # the loop's runtime in this call (resumed steps not included)
    log_history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    adapter_dir: str | None = None
    config: RecoveryConfig | None = None
    budget: dict[str, Any] = field(default_factory=dict)  # the record from allocate_ranks / uniform_ranks
    processes: int = 1
    sharded: bool = False  # FSDP
    data: dict[str, Any] = field(default_factory=dict)  # the data's description (source, kind, skipped)

    def summary(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready, for the pruned directory's metadata."""
        out = {
            "train": self.train,
            "allocation": self.allocation,
            "ranks": list(self.ranks),
            "trainable_params": self.trainable_params,
            "uniform_params": self.uniform_params,
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "start_step": self.start_step,
            "final_loss": self.final_loss,
            "train_loss": self.train_loss,
            "train_seconds": self.train_seconds,
            "resumed_from": self.resumed_from,
            "adapter_dir": self.adapter_dir,
            "budget": dict(self.budget),
            "processes": self.processes,
            "sharded": self.sharded,
            "data": dict(self.data),
        }
        if self.config is not None:
            out["config"] = {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.config).items()
            }
            out["config"]["lora_alpha"] = self.config.lora_alpha
        return out


def plan_batch(config: RecoveryConfig, world: int) -> tuple[int, int]:
    """Gradient accumulation and optimizer steps of a run on ``world`` processes.

    ``batch_tokens`` fixes the global batch (``batch_size x seqlen x grad_accum x world``), so the
    accumulation follows the process count; ``max_tokens`` sets the steps from that batch.
    """
    accum = config.grad_accum
    per_micro_step = config.batch_size * config.seqlen * world
    if config.batch_tokens is not None:
        if config.batch_tokens % per_micro_step:
            raise CfspError(
                f"--batch-tokens {config.batch_tokens} is not a multiple of batch size x seqlen x processes "
                f"({config.batch_size} x {config.seqlen} x {world} = {per_micro_step}); use a multiple of it"
            )
        accum = config.batch_tokens // per_micro_step
    steps = config.steps
    if config.max_tokens is not None:
        steps = max(1, math.ceil(config.max_tokens / (per_micro_step * accum)))
    return accum, steps


def load_data(
    data, tokenizer, config: RecoveryConfig, data_root, cluster: Cluster
) -> RecoveryDataset | TextStream:
    """A loaded set, or a stream for a folder (a corpus of shards or a saved ``datasets`` directory)."""
    if isinstance(data, RecoveryDataset | TextStream):
        return data
    held_out = config.eval_windows if config.eval_steps else 0
    if Path(str(data)).expanduser().is_dir():
        return TextStream(data, tokenizer, config.seqlen, held_out, quiet=not cluster.main)
    return load_recovery_data(data, tokenizer, config.seqlen, config.max_samples, data_root)


def _held_out(dataset, config: RecoveryConfig) -> list:
    if not config.eval_steps:
        return []
    if isinstance(dataset, TextStream):
        return dataset.held_out_examples()
    if len(dataset) <= config.eval_windows:
        raise CfspError(
            f"the recovery data has {len(dataset)} examples, not more than the {config.eval_windows} held out "
            "for --eval-steps; lower --eval-windows or give more data"
        )
    return dataset.examples[: config.eval_windows]


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device: the frame the gathered
    weights of a sharded run are poured into on rank 0, at no memory cost."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def _gathered(wrapped: nn.Module, frame: nn.Module | None, cluster: Cluster) -> nn.Module | None:
    """The sharded student's full weights, on rank 0's CPU, in ``frame`` (every process takes part)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student = get_model_state_dict(wrapped.student, options=options)  # the teacher stays where it is
    if not cluster.main:
        return None
    base = frame.get_base_model() if hasattr(frame, "get_base_model") else frame
    base.load_state_dict(student, assign=True, strict=False)
    missing = [name for name, p in base.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered weights lack {missing[:3]}")
    return frame


def _evaluate(wrapped, batches, cluster: Cluster, autocast) -> float:
    """Mean next-token loss over the held-out batches, all processes together."""
    wrapped.eval()
    total = count = 0.0
    with torch.no_grad(), autocast():
        for batch in batches:
            batch = {k: v.to(cluster.device) for k, v in batch.items()}
            lm, _ = wrapped(**batch, lm_only=True)
            total += float(lm)
            count += token_counts(batch)[0]
    wrapped.train()
    total, count = cluster.sum([total, count])
    return total / max(count, 1.0)


def recover(
    model: nn.Module,
    tokenizer,
    data: RecoveryDataset | TextStream | str | os.PathLike,
    block_importance: Sequence[float] | None = None,
    config: RecoveryConfig | None = None,
    output_dir: str | os.PathLike = "recovery",
    resume: bool | str | os.PathLike = False,
    save_adapter: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    teacher: nn.Module | None = None,
    cluster: Cluster | None = None,
) -> RecoveryResult:
    """Train ``model`` on ``data`` and return it as a plain model again (on rank 0; None elsewhere).

    ``config.train``: ``lora`` injects (IG-)LoRA adapters and merges them afterwards; ``mlp``
    trains the MLP weights of every block directly, ``all`` every block weight. ``model`` is
    modified in place. ``data``: a loaded ``RecoveryDataset`` or ``TextStream``, a source for
    ``load_recovery_data``, or a folder of text shards (streamed). Checkpoints go to
    ``output_dir/checkpoint-N``; ``resume=True`` continues from the latest one (the same base model
    must be passed again), on any process count. ``save_adapter`` also writes the adapter alone.
    ``teacher``: the dense model, for ``config.objective`` ``kd`` or ``lm+kd``; it is never trained.
    Under ``torchrun`` every process calls this with the same arguments.
    """
    from transformers import get_scheduler, set_seed

    config = config or RecoveryConfig()
    if config.objective != "lm" and teacher is None:
        raise CfspError(f"objective {config.objective!r} needs the dense model as teacher (--teacher)")
    cluster = cluster or Cluster.start(next(model.parameters()).device)
    lora = config.train == "lora"
    if save_adapter is not None:
        if not lora:
            raise CfspError(
                f"--save-adapter needs LoRA training; with --train {config.train} there is no adapter"
            )
        check_output(save_adapter)
    accum, steps = plan_batch(config, cluster.world)
    ranks, budget = plan_ranks(model, block_importance, config) if lora else ([], {})
    lora_config = build_lora_config(model, ranks, config) if lora else None
    checkpoint = resume_checkpoint(output_dir, resume)
    examples_per_step = config.batch_size * accum * cluster.world
    if checkpoint is not None:
        if lora:
            check_checkpoint_ranks(checkpoint, lora_config)
        saved = read_state(checkpoint)
        if saved["examples_per_step"] != examples_per_step or saved["train"] != config.train:
            raise CfspError(
                f"checkpoint {checkpoint} was trained with --train {saved['train']} and "
                f"{saved['examples_per_step']} examples per step, this run would use --train {config.train} and "
                f"{examples_per_step}; resume with the same --train and global batch (--batch-tokens)"
            )
    dataset = load_data(data, tokenizer, config, data_root, cluster)
    if isinstance(dataset, RecoveryDataset) and len(dataset) == 0:
        raise CfspError("the recovery data set is empty; give a file with at least one example")
    held_out = _held_out(dataset, config)
    set_seed(config.seed)  # LoRA A init is reproducible
    sharded = cluster.distributed and config.fsdp
    if cluster.distributed and not sharded:  # FSDP moves each block to the device as it shards it
        model.to(cluster.device)
        if teacher is not None:
            teacher.to(cluster.device)
    if lora:
        trained = attach_lora(model, ranks, config)
        actual = count_trainable(trained)
        if actual != budget["trainable_params"]:
            raise RuntimeError(
                f"peft built {actual} trainable parameters, expected {budget['trainable_params']}"
            )
        student = trained.get_base_model()
    else:
        trained = student = model
        budget = train_block_weights(model, config.train)
        actual = budget["trainable_params"]
    if config.gradient_checkpointing:  # non-reentrant: works with frozen base weights and no input grads
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    objective = RecoveryLoss(
        student, teacher, config.objective, config.kd_temperature, config.kd_top_k, config.loss_chunk
    )
    frame = _meta_copy(trained) if sharded and cluster.main else None
    wrapped = wrap(objective, cluster, config.fsdp, config.bf16)
    decay = [p for p in wrapped.parameters() if p.requires_grad and p.ndim >= 2]
    plain = [p for p in wrapped.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scheduler = get_scheduler(config.lr_scheduler, optimizer, config.warmup_steps, steps)
    start_step, tokens_seen, history = 0, 0, []
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, wrapped, optimizer)
        start_step, tokens_seen, history = state["step"], state["tokens_seen"], state["log_history"]
        for _ in range(start_step):
            scheduler.step()
    collate = PadCollator(pad_id(tokenizer))
    device_type = cluster.device.type
    autocast = (
        (lambda: torch.autocast(device_type, dtype=torch.bfloat16))
        if config.bf16 and not sharded
        else nullcontext
    )
    eval_batches = (
        held_out_batches(held_out, cluster.rank, cluster.world, config.batch_size, collate)
        if held_out
        else []
    )
    batches = rank_batches(
        global_examples(dataset, config.seed, len(held_out), start_step * examples_per_step),
        cluster.rank,
        cluster.world,
        config.batch_size,
        collate,
    )
    if cluster.main:
        log.info(
            "recovery: %d process(es)%s, %d steps of %d examples (%d per process and micro-batch, %d accumulated)",
            cluster.world,
            " (FSDP)" if sharded else (" (DDP)" if cluster.distributed else ""),
            steps,
            examples_per_step,
            config.batch_size,
            accum,
        )
    if eval_batches and start_step == 0:
        history.append(
            {"step": 0, "tokens": 0, "eval_loss": _evaluate(wrapped, eval_batches, cluster, autocast)}
        )
    run_losses: list[float] = []
    window: list[float] = []
    began, tokens_before = time.perf_counter(), tokens_seen
    progress = _progress(steps, start_step, cluster.main)
    for step in range(start_step + 1, steps + 1):
        torch.manual_seed(config.seed * 1_000_003 + step * 7_919 + cluster.rank)  # dropout: resumable
        micro = [next(batches) for _ in range(accum)]
        step_loss, step_tokens = _accumulate(wrapped, micro, cluster, autocast)
        norm = _clip(wrapped, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += step_tokens
        run_losses.append(step_loss)
        window.append(step_loss)
        progress.update(1)
        elapsed = time.perf_counter() - began
        progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{(tokens_seen - tokens_before) / elapsed:,.0f}")
        if step % config.logging_steps == 0 or step == steps:
            history.append(
                {
                    "step": step,
                    "tokens": tokens_seen,
                    "loss": sum(window) / len(window),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": norm,
                }
            )
            window = []
        if eval_batches and config.eval_steps and (step % config.eval_steps == 0 or step == steps):
            loss = _evaluate(wrapped, eval_batches, cluster, autocast)
            history.append({"step": step, "tokens": tokens_seen, "eval_loss": loss})
            if cluster.main:
                progress.write(f"step {step}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
        if step % config.save_steps == 0 or step == steps:
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "log_history": history,
                "examples_per_step": examples_per_step,
                "train": config.train,
                "lora": lora_record(lora_config),
                "processes": cluster.world,
            }
            save_checkpoint(
                Path(output_dir), step, wrapped, optimizer, state, cluster, config.save_total_limit
            )
    progress.close()
    seconds = time.perf_counter() - began
    if save_adapter is not None and not sharded and cluster.main:
        with StagedOutput(save_adapter) as folder:
            trained.save_pretrained(str(folder))
    result_model = _gathered(wrapped, frame, cluster) if sharded else trained
    if sharded and save_adapter is not None and cluster.main:
        with StagedOutput(save_adapter) as folder:
            result_model.save_pretrained(str(folder))
    if result_model is not None:
        result_model = merge_lora(result_model) if lora else result_model.requires_grad_(False).eval()
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return RecoveryResult(
        model=result_model,
        ranks=list(ranks),
        trainable_params=actual,
        uniform_params=budget.get("uniform_params", 0),
        allocation=config.allocation if lora else "none",
        train=config.train,
        tokens_seen=tokens_seen,
        steps=steps,
        start_step=start_step,
        final_loss=float(losses[-1]) if losses else None,
        train_loss=sum(run_losses) / len(run_losses) if run_losses else None,
        train_seconds=seconds,
        log_history=history,
        resumed_from=checkpoint,
        adapter_dir=str(save_adapter) if save_adapter is not None else None,
        config=config,
        budget=budget,
        processes=cluster.world,
        sharded=sharded,
        data=dataset.describe(),
    )


def _accumulate(wrapped: nn.Module, micro: list[dict], cluster: Cluster, autocast) -> tuple[float, int]:
    """Forward and backward of one step's micro-batches; returns the step's loss and tokens over all
    processes. Token losses are divided by the step's token count over all processes, so the
    gradient is the same however the step is split; the engines average it over processes, hence
    the factor ``world``."""
    counts = cluster.sum([sum(token_counts(b)[i] for b in micro) for i in (0, 1)])
    lm_count, kd_count = max(counts[0], 1.0), max(counts[1], 1.0)
    step_loss = step_tokens = 0.0
    for index, batch in enumerate(micro):
        batch = {k: v.to(cluster.device) for k, v in batch.items()}
        skip_gradient_sync(wrapped, index < len(micro) - 1)
        with autocast():
            lm, kd = wrapped(**batch)
        loss = lm / lm_count + kd / kd_count
        (loss * cluster.world).backward()
        step_loss += float(loss.detach())
        step_tokens += float(batch["attention_mask"].sum())
    step_loss, step_tokens = cluster.sum([step_loss, step_tokens])
    return step_loss, int(step_tokens)


def _clip(wrapped: nn.Module, max_norm: float) -> float | None:
    params = [p for p in wrapped.parameters() if p.grad is not None]
    if max_norm <= 0 or not params:
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _progress(steps: int, start: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=steps, initial=start, desc="recovery", unit="step", disable=not show, dynamic_ncols=True
    )
