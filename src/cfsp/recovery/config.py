"""The settings of one recovery run, checked when they are made so bad values fail before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cfsp.errors import CfspError
from cfsp.layouts import MLP_LAYOUTS

# The attention projections and every MLP layout's projections (cfsp.layouts); each model has
# some of them (Llama: q/k/v/o + gate/up/down; Phi-3: qkv_proj/o_proj + gate_up_proj/down_proj).
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    *dict.fromkeys(name for layout in MLP_LAYOUTS for name in layout.names),
)
OBJECTIVES = ("lm", "kd", "lm+kd")  # next-token loss, distillation from the dense model, or both
TRAINED = ("lora", "mlp")  # (IG-)LoRA adapters merged afterwards, or the pruned MLP weights themselves
# Learning rates of the recovery benchmark (benchmarks/recovery.py): adapters start at zero and take
# a larger step than full weights.
DEFAULT_LR = {"lora": 5e-4, "mlp": 1e-4}


@dataclass
class RecoveryConfig:
    """Settings of one recovery run; validated on creation so bad values fail before training."""

    rank: int = 8  # uniform rank R; also sets the trainable-parameter budget
    alpha: float | None = None  # None -> 2 * rank
    dropout: float = 0.05
    allocation: str = "importance"  # "importance" (IG-LoRA) or "uniform"
    min_rank: int = 1
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 200
    lr: float | None = None  # None -> DEFAULT_LR[train]
    batch_size: int = 4
    grad_accum: int = 4
    seqlen: int = 256
    max_samples: int | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int | None = 3
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    objective: str = "lm"  # see cfsp.distillation; kd and lm+kd need the dense model as teacher
    train: str = "lora"  # what trains: "lora" adapters or the "mlp" weights of every block
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
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
        }
        for name, value in positive.items():
            if value < 1:
                raise CfspError(f"recovery {name} must be >= 1, got {value}")
        numbers = {
            "lr": self.lr,
            "dropout": self.dropout,
            "weight_decay": self.weight_decay,
            "kd_temperature": self.kd_temperature,
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
