"""Recovery training through the Hugging Face Trainer: checkpoints, resume, devices, the result."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfsp.errors import CfspError
from cfsp.outdir import StagedOutput, check_output
from cfsp.recovery.config import RecoveryConfig
from cfsp.recovery.data import PadCollator, RecoveryDataset, load_recovery_data, pad_id
from cfsp.recovery.distillation import distillation_trainer
from cfsp.recovery.ranks import plan_ranks
from cfsp.recovery.trainable import (
    attach_lora,
    build_lora_config,
    count_trainable,
    merge_lora,
    train_mlp_weights,
)


@dataclass
class RecoveryResult:
    """What recovery produced: the plain (merged) model and how it was trained."""

    model: nn.Module
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
    train_seconds: float | None = None  # the Trainer's runtime of this call (resumed steps not included)
    log_history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    adapter_dir: str | None = None
    config: RecoveryConfig | None = None
    budget: dict[str, Any] = field(default_factory=dict)  # the record from allocate_ranks / uniform_ranks

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
        }
        if self.config is not None:
            out["config"] = {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.config).items()
            }
            out["config"]["lora_alpha"] = self.config.lora_alpha
        return out


def resume_checkpoint(output_dir: str | os.PathLike, resume: bool | str | os.PathLike) -> str | None:
    """The checkpoint to resume from: ``True`` -> latest ``checkpoint-N`` in ``output_dir``; a path -> it.

    Refuses to start fresh over existing checkpoints, which a later resume would mix up.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    latest = get_last_checkpoint(str(out)) if out.is_dir() else None
    if resume is False:
        if latest is not None:
            raise CfspError(
                f"{out} already holds checkpoints ({Path(latest).name}); pass --resume to continue "
                "or choose another output directory"
            )
        return None
    if resume is True:
        if latest is None:
            raise CfspError(f"no checkpoint-N folder in {out} to resume from; run without --resume first")
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise CfspError(f"checkpoint {path} does not exist; pass --resume alone for the latest one")
    return str(path)


def check_checkpoint_ranks(checkpoint: str | os.PathLike, lora_config) -> None:
    """Fail with one line when a checkpoint's adapter has other ranks than this run would build."""
    saved_path = Path(checkpoint) / "adapter_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    if saved.get("rank_pattern") != lora_config.rank_pattern or saved.get("r") != lora_config.r:
        raise CfspError(
            f"checkpoint {checkpoint} was trained with other LoRA ranks than this run; resume with the same "
            "rank, allocation and block importances, or start a fresh output directory"
        )


def _start_step_callback():
    """A Trainer callback that records the global step training starts from (> 0 after a resume)."""
    from transformers import TrainerCallback

    class StartStep(TrainerCallback):
        def __init__(self) -> None:
            self.step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.step = state.global_step

    return StartStep()


def training_arguments(
    config: RecoveryConfig, output_dir: str | os.PathLike, device: torch.device | None = None
):
    """Hugging Face ``TrainingArguments`` for one recovery run, on ``device``'s kind (default: the GPUs
    if any); the Trainer itself spreads a GPU run over every visible GPU through accelerate."""
    from transformers import TrainingArguments

    kind = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = kind == "cuda"
    extra: dict[str, Any] = {}
    if config.gradient_checkpointing:  # non-reentrant: works with frozen base weights and no input grads
        extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        report_to="none",
        use_cpu=kind == "cpu",
        bf16=config.bf16,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_pin_memory=cuda,
        include_num_input_tokens_seen="non_padding",
        **extra,
    )


def recover(
    model: nn.Module,
    tokenizer,
    data: RecoveryDataset | str | os.PathLike,
    block_importance: Sequence[float] | None = None,
    config: RecoveryConfig | None = None,
    output_dir: str | os.PathLike = "recovery",
    resume: bool | str | os.PathLike = False,
    save_adapter: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    teacher: nn.Module | None = None,
) -> RecoveryResult:
    """Train ``model`` on ``data`` with the HF Trainer and return it as a plain model again.

    ``config.train``: ``lora`` injects (IG-)LoRA adapters and merges them afterwards; ``mlp``
    trains the MLP weights of every block directly. ``model`` is modified in place. ``data`` is a
    loaded ``RecoveryDataset`` or a source for ``load_recovery_data``. Checkpoints go to
    ``output_dir/checkpoint-N``; ``resume=True`` continues from the latest one (the same base
    model must be passed again). ``save_adapter`` also writes the adapter alone before merging.
    ``teacher``: the dense model, for ``config.objective`` ``kd`` or ``lm+kd`` (it stays on its
    own device and is never trained).
    """
    from transformers import set_seed

    config = config or RecoveryConfig()
    if config.objective != "lm" and teacher is None:
        raise CfspError(f"objective {config.objective!r} needs the dense model as teacher (--teacher)")
    lora = config.train == "lora"
    if save_adapter is not None:
        if not lora:
            raise CfspError("--save-adapter needs LoRA training; with --train mlp there is no adapter")
        check_output(save_adapter)
    if lora:
        ranks, budget = plan_ranks(model, block_importance, config)  # cheap checks before tokenizing
    else:
        ranks, budget = [], {}
    checkpoint = resume_checkpoint(output_dir, resume)
    if checkpoint is not None and lora:
        check_checkpoint_ranks(checkpoint, build_lora_config(model, ranks, config))
    if isinstance(data, RecoveryDataset):
        dataset = data
    else:
        dataset = load_recovery_data(data, tokenizer, config.seqlen, config.max_samples, data_root)
    if len(dataset) == 0:
        raise CfspError("the recovery data set is empty; give a file with at least one example")
    set_seed(config.seed)  # LoRA A init and data order are reproducible
    if lora:
        trained = attach_lora(model, ranks, config)
        actual = count_trainable(trained)
        if actual != budget["trainable_params"]:
            raise RuntimeError(
                f"peft built {actual} trainable parameters, expected {budget['trainable_params']}"
            )
    else:
        trained, budget = model, train_mlp_weights(model)
        actual = budget["trainable_params"]
    start = _start_step_callback()
    trainer_class = distillation_trainer(teacher, config.objective, config.kd_temperature)
    trainer = trainer_class(
        model=trained,
        args=training_arguments(config, output_dir, next(model.parameters()).device),
        train_dataset=dataset,
        data_collator=PadCollator(pad_id(tokenizer)),
        callbacks=[start],
    )
    output = trainer.train(resume_from_checkpoint=checkpoint)
    if save_adapter is not None:
        with StagedOutput(save_adapter) as folder:
            trained.save_pretrained(str(folder))
    history = list(trainer.state.log_history)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return RecoveryResult(
        model=merge_lora(trained) if lora else model.requires_grad_(False).eval(),
        ranks=list(ranks),
        trainable_params=actual,
        uniform_params=budget.get("uniform_params", 0),
        allocation=config.allocation if lora else "none",
        train=config.train,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        steps=trainer.state.global_step,
        start_step=start.step,
        final_loss=float(losses[-1]) if losses else None,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        train_seconds=output.metrics.get("train_runtime"),
        log_history=history,
        resumed_from=checkpoint,
        adapter_dir=str(save_adapter) if save_adapter is not None else None,
        config=config,
        budget=budget,
    )
