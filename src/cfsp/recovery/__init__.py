"""Recovery of a pruned model: a short training run that wins back quality, then a plain model again.

The pieces, in the order a run uses them:

- ``config``: ``RecoveryConfig``, every setting of a run, checked up front;
- ``data``: instruction pairs (loss on the response only) or packed text, the named local sets;
- ``ranks``: IG-LoRA's rule that gives each block a LoRA rank by importance at the uniform budget;
- ``trainable``: what trains, LoRA adapters (peft, merged afterwards) or the MLP weights themselves;
- ``stream``: a folder of text shards (a corpus too large to load), packed as it is read;
- ``batches``: one global order of examples, split between processes by position;
- ``distillation``: the objectives, next-token loss and/or KL to the dense teacher, chunked;
- ``distributed``: the processes of a run (torchrun/accelerate) and PyTorch's DDP / FSDP2;
- ``checkpoints``: resumable checkpoints (PyTorch DCP) that load on any process count;
- ``training``: the loop (one process or many) and its result.
"""

from __future__ import annotations

from cfsp.lazy import lazy_exports

# Imported on first use, so that the command line reads RecoveryConfig without loading torch.
_EXPORTS = {
    "ALPACA_PROMPT": "cfsp.recovery.data",
    "ALPACA_PROMPT_NO_INPUT": "cfsp.recovery.data",
    "BUDGET_TOLERANCE": "cfsp.recovery.ranks",
    "Cluster": "cfsp.recovery.distributed",
    "DEFAULT_LR": "cfsp.recovery.config",
    "DEFAULT_TARGETS": "cfsp.recovery.config",
    "IGNORE_INDEX": "cfsp.recovery.data",
    "OBJECTIVES": "cfsp.recovery.config",
    "PadCollator": "cfsp.recovery.data",
    "RECOVERY_MIXES": "cfsp.recovery.data",
    "RECOVERY_SOURCES": "cfsp.recovery.data",
    "RecoveryConfig": "cfsp.recovery.config",
    "RecoveryDataset": "cfsp.recovery.data",
    "RecoveryLoss": "cfsp.recovery.distillation",
    "RecoveryResult": "cfsp.recovery.training",
    "TRAINED": "cfsp.recovery.config",
    "TextStream": "cfsp.recovery.stream",
    "allocate_ranks": "cfsp.recovery.ranks",
    "attach_lora": "cfsp.recovery.trainable",
    "block_targets": "cfsp.recovery.ranks",
    "build_lora_config": "cfsp.recovery.trainable",
    "check_checkpoint_ranks": "cfsp.recovery.checkpoints",
    "count_trainable": "cfsp.recovery.trainable",
    "decoder_blocks": "cfsp.recovery.ranks",
    "format_instruction": "cfsp.recovery.data",
    "global_examples": "cfsp.recovery.batches",
    "head_logits": "cfsp.recovery.distillation",
    "instruction_examples": "cfsp.recovery.data",
    "kd_loss": "cfsp.recovery.distillation",
    "load_recovery_data": "cfsp.recovery.data",
    "lora_param_count": "cfsp.recovery.ranks",
    "merge_lora": "cfsp.recovery.trainable",
    "pad_id": "cfsp.recovery.data",
    "plan_batch": "cfsp.recovery.training",
    "plan_ranks": "cfsp.recovery.ranks",
    "rank_batches": "cfsp.recovery.batches",
    "rank_unit_costs": "cfsp.recovery.ranks",
    "recover": "cfsp.recovery.training",
    "resolve_recovery_source": "cfsp.recovery.data",
    "resume_checkpoint": "cfsp.recovery.checkpoints",
    "text_examples": "cfsp.recovery.data",
    "train_block_weights": "cfsp.recovery.trainable",
    "uniform_ranks": "cfsp.recovery.ranks",
}
__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "BUDGET_TOLERANCE",
    "Cluster",
    "DEFAULT_LR",
    "DEFAULT_TARGETS",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "PadCollator",
    "RECOVERY_MIXES",
    "RECOVERY_SOURCES",
    "RecoveryConfig",
    "RecoveryDataset",
    "RecoveryLoss",
    "RecoveryResult",
    "TRAINED",
    "TextStream",
    "allocate_ranks",
    "attach_lora",
    "block_targets",
    "build_lora_config",
    "check_checkpoint_ranks",
    "count_trainable",
    "decoder_blocks",
    "format_instruction",
    "global_examples",
    "head_logits",
    "instruction_examples",
    "kd_loss",
    "load_recovery_data",
    "lora_param_count",
    "merge_lora",
    "pad_id",
    "plan_batch",
    "plan_ranks",
    "rank_batches",
    "rank_unit_costs",
    "recover",
    "resolve_recovery_source",
    "resume_checkpoint",
    "text_examples",
    "train_block_weights",
    "uniform_ranks",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
