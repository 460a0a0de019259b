"""The settings of one recovery run, checked when they are made so bad values fail before any work.

Like ``PruneConfig``, each field carries its help text; ``cfsp recover`` generates its flags from
them. Nothing heavy is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cfsp.config import option
from cfsp.errors import CfspError

# The attention projections and every MLP layout's projections (cfsp.layouts.MLP_LAYOUTS, checked
# by a test); each model has some of them (Llama: q/k/v/o + gate/up/down; Phi-3: qkv_proj/o_proj +
# gate_up_proj/down_proj).
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "down_proj",
    "up_proj",
    "gate_proj",
    "gate_up_proj",
    "c_proj",
    "c_fc",
    "fc2",
    "fc1",
)
OBJECTIVES = ("lm", "kd", "lm+kd")  # next-token loss, distillation from the dense model, or both
# (IG-)LoRA adapters merged afterwards, the pruned MLP weights themselves, or every weight but the
# embeddings and the output head
TRAINED = ("lora", "mlp", "all")
# Learning rates of the recovery benchmark (benchmarks/recovery.py): adapters start at zero and take
# a larger step than full weights.
DEFAULT_LR = {"lora": 5e-4, "mlp": 1e-4, "all": 1e-4}


@dataclass
class RecoveryConfig:
    """Settings of one recovery run; validated on creation so bad values fail before training."""

    rank: int = option(8, "Uniform LoRA rank R; also sets the trainable-parameter budget.")
    alpha: float | None = option(None, "LoRA alpha (default: 2 x rank).")
    dropout: float = option(0.05, "LoRA dropout.")
    allocation: str = option(
        "importance",
        "LoRA ranks per block: importance (IG-LoRA) or uniform.",
        choices=("importance", "uniform"),
    )
    min_rank: int = option(1, "Smallest rank IG-LoRA gives a block.")
    target_modules: tuple[str, ...] = option(
        DEFAULT_TARGETS, "Projections that get adapters, comma-separated (those a model lacks are skipped)."
    )
    steps: int = option(200, "Optimizer steps (set from --max-tokens when that is given).")
    max_tokens: int | None = option(
        None, "Training budget in tokens: steps = max_tokens / tokens per step (global batch)."
    )
    lr: float | None = option(None, "Learning rate (default: 5e-4 for lora, 1e-4 for mlp).")
    batch_size: int = option(4, "Examples per step and device.")
    grad_accum: int = option(4, "Gradient accumulation steps (set from --batch-tokens when given).")
    batch_tokens: int | None = option(
        None,
        "Global batch in tokens per optimizer step, over all processes: sets the gradient accumulation, "
        "so a run keeps its batch on any process count.",
    )
    seqlen: int = option(256, "Maximum tokens per example.")
    max_samples: int | None = option(None, "Use at most this many training examples.")
    warmup_steps: int = option(0, "Learning-rate warm-up steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    lr_scheduler: str = option("linear", "Learning-rate schedule (a transformers scheduler name).")
    logging_steps: int = option(10, "Log the loss every N steps.")
    save_steps: int = option(100, "Save a resumable checkpoint every N steps.")
    save_total_limit: int | None = option(3, "Checkpoints kept (older ones are deleted).")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass (less memory).")
    bf16: bool = option(False, "bfloat16 mixed precision (on a GPU that has it).")
    fsdp: bool = option(
        False,
        "Under torchrun/accelerate: shard student and teacher over the processes (PyTorch FSDP2) "
        "instead of replicating them (DDP).",
    )
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0: no clipping).")
    eval_steps: int | None = option(None, "Report the held-out next-token loss every N steps.")
    eval_windows: int = option(
        32, "Held-out examples for --eval-steps: the first ones of the data, never trained on."
    )
    seed: int = option(0, "Seed.")
    objective: str = option(
        "lm", "lm (next-token loss), kd (distil the dense model) or lm+kd.", choices=OBJECTIVES
    )
    train: str = option(
        "lora",
        "lora (adapters, merged afterwards), mlp (the pruned MLP weights) or all (every block weight).",
        choices=TRAINED,
    )
    kd_temperature: float = option(1.0, "Distillation temperature.")
    kd_top_k: int | None = option(
        None, "Distil from the teacher's k most likely tokens only (default: the whole vocabulary)."
    )
    loss_chunk: int = option(
        1024, "Token positions whose logits are made at once (loss memory grows with this x vocabulary)."
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):  # the command line's comma-separated list
            self.target_modules = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        self.target_modules = tuple(self.target_modules)
        if self.train not in TRAINED:
            raise CfspError(f"unknown --train {self.train!r}; choose one of {', '.join(TRAINED)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.train]
        positive = {
            "rank": self.rank,
            "min_rank": self.min_rank,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
            "loss_chunk": self.loss_chunk,
            "eval_windows": self.eval_windows,
        }
        for name in ("max_tokens", "batch_tokens", "eval_steps", "kd_top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CfspError(f"recovery {name} must be >= 1 or unset, got {value}")
        for name, value in positive.items():
            if value < 1:
                raise CfspError(f"recovery {name} must be >= 1, got {value}")
        numbers = {
            "lr": self.lr,
            "dropout": self.dropout,
            "weight_decay": self.weight_decay,
            "kd_temperature": self.kd_temperature,
            "max_grad_norm": self.max_grad_norm,
        }
        if self.alpha is not None:
            numbers["alpha"] = self.alpha
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise CfspError(f"recovery {name} must be a finite number, got {value}")
        if self.min_rank > self.rank:
            raise CfspError(f"min_rank ({self.min_rank}) exceeds rank ({self.rank}); lower --min-rank")
        if self.allocation not in ("importance", "uniform"):
            raise CfspError(f"unknown rank allocation {self.allocation!r}; use 'importance' or 'uniform'")
        if not 0.0 <= self.dropout < 1.0:
            raise CfspError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise CfspError(f"learning rate must be > 0, got {self.lr}")
        if self.objective not in OBJECTIVES:
            raise CfspError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.max_grad_norm < 0:
            raise CfspError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.kd_temperature <= 0:
            raise CfspError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        if self.seqlen < 2:
            raise CfspError(f"recovery seqlen must be >= 2 tokens, got {self.seqlen}")
        if self.max_samples is not None and self.max_samples < 1:
            raise CfspError(f"max_samples must be >= 1 or unset, got {self.max_samples}")
        if not self.target_modules:
            raise CfspError("no LoRA target modules given; use e.g. q_proj,k_proj,v_proj,o_proj,...")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank
