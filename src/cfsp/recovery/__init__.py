"""Recovery of a pruned model: a short training run that wins back quality, then a plain model again.

The pieces, in the order a run uses them:

- ``config``: ``RecoveryConfig``, every setting of a run, checked up front;
- ``data``: instruction pairs (loss on the response only) or packed text, the named local sets;
- ``ranks``: IG-LoRA's rule that gives each block a LoRA rank by importance at the uniform budget;
- ``trainable``: what trains, LoRA adapters (peft, merged afterwards) or the MLP weights themselves;
- ``distillation``: the objectives, next-token loss and/or KL to the dense teacher;
- ``training``: the Hugging Face Trainer run (checkpoints, resume, devices) and its result.
"""

from cfsp.recovery.config import DEFAULT_LR, DEFAULT_TARGETS, OBJECTIVES, TRAINED, RecoveryConfig
from cfsp.recovery.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    RECOVERY_MIXES,
    RECOVERY_SOURCES,
    PadCollator,
    RecoveryDataset,
    format_instruction,
    instruction_examples,
    load_recovery_data,
    pad_id,
    resolve_recovery_source,
    text_examples,
)
from cfsp.recovery.distillation import distillation_trainer, kd_loss
from cfsp.recovery.ranks import (
    BUDGET_TOLERANCE,
    allocate_ranks,
    block_targets,
    decoder_blocks,
    lora_param_count,
    plan_ranks,
    rank_unit_costs,
    uniform_ranks,
)
from cfsp.recovery.trainable import (
    attach_lora,
    build_lora_config,
    count_trainable,
    merge_lora,
    train_mlp_weights,
)
from cfsp.recovery.training import (
    RecoveryResult,
    check_checkpoint_ranks,
    recover,
    resume_checkpoint,
    training_arguments,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "BUDGET_TOLERANCE",
    "DEFAULT_LR",
    "DEFAULT_TARGETS",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "RECOVERY_MIXES",
    "RECOVERY_SOURCES",
    "TRAINED",
    "PadCollator",
    "RecoveryConfig",
    "RecoveryDataset",
    "RecoveryResult",
    "allocate_ranks",
    "attach_lora",
    "block_targets",
    "build_lora_config",
    "check_checkpoint_ranks",
    "count_trainable",
    "decoder_blocks",
    "distillation_trainer",
    "format_instruction",
    "instruction_examples",
    "kd_loss",
    "load_recovery_data",
    "lora_param_count",
    "merge_lora",
    "pad_id",
    "plan_ranks",
    "rank_unit_costs",
    "recover",
    "resolve_recovery_source",
    "text_examples",
    "train_mlp_weights",
    "uniform_ranks",
    "resume_checkpoint",
    "training_arguments",
]
