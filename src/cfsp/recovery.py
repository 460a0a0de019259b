"""Importance-guided LoRA (IG-LoRA) recovery of a pruned model.

After pruning, LoRA adapters on the attention and MLP projections are trained on a small
instruction or text set and then merged into the weights. IG-LoRA gives each decoder block its
own rank, following the block's coarse importance, at the same number of trainable parameters as
uniform LoRA of rank ``R``, so the two are compared at equal budget.

Rank rule (``allocate_ranks``). For block ``l`` let ``c_l = sum(in + out)`` over its targeted
``nn.Linear`` modules: one rank unit costs ``c_l`` parameters there (a LoRA of rank ``r`` on
``Linear(in, out)`` has ``r * (in + out)``), and ``c_l`` differs between blocks because pruned FFN
widths differ. The uniform budget is ``U = R * sum_l c_l``. With ``w_l = I_l / sum(I)``:

1. ideal ranks ``t_l = max(min_rank, s * w_l)``, with the scale ``s`` solved (bisection) so that
   ``sum_l c_l * t_l = U`` exactly: ranks proportional to importance, floored at ``min_rank``;
2. integer ranks ``r_l = max(min_rank, round(t_l))``;
3. greedy fix-up, one rank unit at a time and only in steps that bring ``sum_l c_l * r_l`` strictly
   closer to ``U``: add 1 to the block furthest below its ideal (when under budget) or take 1 from
   the block furthest above it (when over), never letting a more important block fall below a less
   important one. This runs until the gap is within 2 % of ``U``, then continues only with steps
   that leave the moved block within one unit of its ideal (closer budget, ranks still near ideal);
4. if the gap is still above 2 % of ``U`` (only for very small ``R`` or few blocks), the ideal
   ranks are pulled toward ``R`` (``t <- (1 - a) t + a R``, ``a`` = 0.1, 0.2, ...) and steps 2-3
   repeated; at ``a = 1`` the allocation is uniform and the gap is zero, so this always ends.

Alpha: ``alpha`` defaults to ``2 * rank`` (16 at rank 8, the usual LoRA choice) and each block gets
``alpha_l = alpha * r_l / R``, so the LoRA scaling ``alpha / r`` is the same in every block and a
block's larger rank means more capacity, not a larger update scale.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfsp import models
from cfsp.data import named_file, read_jsonl
from cfsp.errors import CfspError
from cfsp.outdir import StagedOutput, check_output

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
BUDGET_TOLERANCE = 0.02  # importance and uniform budgets must agree within this fraction
IGNORE_INDEX = -100  # label value the causal-LM loss skips
OBJECTIVES = ("lm", "kd", "lm+kd")  # next-token loss, distillation from the dense model, or both

# Named recovery sets: name -> file inside the data directory.
RECOVERY_SOURCES: dict[str, str] = {
    "gpteacher_roleplay": "gpteacher_roleplay/train.jsonl",
    "dolly_hhrlhf_small": "dolly_hhrlhf_small/train.jsonl",
    "wikitext2": "wikitext2/validation.jsonl",
}

# The Alpaca prompt template (the dolly_hhrlhf_small prompts already contain it).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


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
    lr: float = 2e-4
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
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
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


@dataclass
class RecoveryResult:
    """What recovery produced: the merged plain model and how it was trained."""

    model: nn.Module
    ranks: list[int]
    trainable_params: int
    uniform_params: int
    allocation: str
    steps: int
    start_step: int = 0
    final_loss: float | None = None
    train_loss: float | None = None
    log_history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    adapter_dir: str | None = None
    config: RecoveryConfig | None = None
    budget: dict[str, Any] = field(default_factory=dict)  # the record from allocate_ranks / uniform_ranks

    def summary(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready, for the pruned directory's metadata."""
        out = {
            "allocation": self.allocation,
            "ranks": list(self.ranks),
            "trainable_params": self.trainable_params,
            "uniform_params": self.uniform_params,
            "steps": self.steps,
            "start_step": self.start_step,
            "final_loss": self.final_loss,
            "train_loss": self.train_loss,
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


# ----------------------------------------------------------------------------- blocks and budget


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks and their module path (``model.layers``), which peft patterns need."""
    layers = models.decoder_blocks(model)
    name = next(name for name, module in model.named_modules() if module is layers)
    return name, layers


def block_targets(block: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of one block whose last name component is a LoRA target."""
    wanted = set(target_modules)
    return {
        name: module
        for name, module in block.named_modules()
        if name and name.split(".")[-1] in wanted and isinstance(module, nn.Linear)
    }


def rank_unit_costs(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS) -> list[int]:
    """Trainable parameters one LoRA rank unit adds to each block: ``sum(in + out)`` of its targets."""
    _, blocks = decoder_blocks(model)
    costs, found = [], set()
    for index, block in enumerate(blocks):
        linears = block_targets(block, target_modules)
        if not linears:
            raise CfspError(
                f"decoder block {index} has none of the LoRA targets {', '.join(target_modules)}; "
                "check the target module names"
            )
        found.update(name.split(".")[-1] for name in linears)
        costs.append(sum(m.in_features + m.out_features for m in linears.values()))
    missing = sorted(set(target_modules) - found)
    if missing:
        raise CfspError(
            f"LoRA target(s) {', '.join(missing)} match no Linear in any decoder block; fix the names"
        )
    return costs


def lora_param_count(costs: Sequence[int], ranks: Sequence[int]) -> int:
    """Trainable LoRA parameters for per-block ``ranks`` given per-block rank-unit ``costs``."""
    return int(sum(c * r for c, r in zip(costs, ranks, strict=True)))


def _ideal_ranks(weights: Sequence[float], costs: Sequence[int], budget: float, min_rank: int) -> list[float]:
    """Real ranks ``max(min_rank, s * w)`` whose cost is exactly ``budget`` (scale found by bisection)."""

    def cost(scale: float) -> float:
        return sum(c * max(min_rank, scale * w) for c, w in zip(costs, weights, strict=True))

    low = 0.0
    high = budget / min(c * w for c, w in zip(costs, weights, strict=True) if w > 0)
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) < budget else (low, mid)
    return [max(float(min_rank), high * w) for w in weights]


def _round_to_budget(
    ideal: Sequence[float], order: Sequence[float], costs: Sequence[int], budget: int, min_rank: int
) -> list[int]:
    """Integer ranks near ``ideal`` whose cost is within ``BUDGET_TOLERANCE`` of ``budget`` if steps allow.

    Rounded ranks are moved one unit at a time, always toward the budget: first as needed to get
    within tolerance, then only while the moved block stays within one unit of its ideal.
    """
    ranks = [max(min_rank, math.floor(t + 0.5)) for t in ideal]
    count = len(ranks)
    gap = lora_param_count(costs, ranks) - budget

    def best_move(near_ideal: bool) -> int | None:
        step = -1 if gap > 0 else 1
        best, best_key = None, None
        for i in range(count):
            new = ranks[i] + step
            if new < min_rank or abs(gap + step * costs[i]) >= abs(gap):
                continue
            if near_ideal and abs(new - ideal[i]) >= 1:
                continue
            # Keep the order: no block drops below a less important one or rises above a more important one.
            if step < 0 and any(order[j] < order[i] and ranks[j] > new for j in range(count)):
                continue
            if step > 0 and any(order[j] > order[i] and ranks[j] < new for j in range(count)):
                continue
            key = (ranks[i] - ideal[i]) * -step  # how far above (removing) / below (adding) its ideal
            if best_key is None or key > best_key:
                best, best_key = i, key
        return best

    for near_ideal in (False, True):
        while gap != 0 and (near_ideal or abs(gap) > BUDGET_TOLERANCE * budget):
            index = best_move(near_ideal)
            if index is None:
                break
            step = -1 if gap > 0 else 1
            ranks[index] += step
            gap += step * costs[index]
    return ranks


def allocate_ranks(
    block_importance: Sequence[float],
    model: nn.Module,
    rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    min_rank: int = 1,
) -> tuple[list[int], dict[str, Any]]:
    """Per-block LoRA ranks that follow block importance at the uniform rank-``rank`` budget.

    Returns the ranks and a budget record: ``trainable_params`` (these ranks), ``uniform_params``
    (rank ``rank`` everywhere), their ``relative_gap``, the per-block ``cost_per_rank`` and the real
    ``ideal_ranks`` before rounding. See the module docstring for the rule.
    """
    if rank < 1 or min_rank < 1 or min_rank > rank:
        raise CfspError(f"need 1 <= min_rank <= rank, got min_rank={min_rank}, rank={rank}")
    costs = rank_unit_costs(model, target_modules)
    importance = [float(v) for v in block_importance]
    if len(importance) != len(costs):
        raise CfspError(
            f"got {len(importance)} block importances for a model with {len(costs)} decoder blocks; "
            "pass the importances from this model's pruning plan"
        )
    if any(not math.isfinite(v) or v < 0 for v in importance) or sum(importance) <= 0:
        raise CfspError("block importances must be finite, >= 0 and not all zero; re-run the pruning plan")
    total = sum(importance)
    weights = [v / total for v in importance]
    uniform = rank * sum(costs)
    proportional = _ideal_ranks(weights, costs, uniform, min_rank)
    for step in range(11):
        pull = step / 10
        ideal = [(1 - pull) * t + pull * rank for t in proportional]
        ranks = _round_to_budget(ideal, importance, costs, uniform, min_rank)
        used = lora_param_count(costs, ranks)
        if abs(used - uniform) <= BUDGET_TOLERANCE * uniform:
            break
    budget = {
        "allocation": "importance",
        "ranks": ranks,
        "trainable_params": used,
        "uniform_params": uniform,
        "relative_gap": (used - uniform) / uniform,
        "cost_per_rank": costs,
        "ideal_ranks": [round(t, 4) for t in ideal],
        "pull_to_uniform": pull,
    }
    return ranks, budget


def uniform_ranks(
    model: nn.Module, rank: int, target_modules: Sequence[str] = DEFAULT_TARGETS
) -> tuple[list[int], dict[str, Any]]:
    """Plain LoRA: rank ``rank`` in every block, with the same budget record as ``allocate_ranks``."""
    costs = rank_unit_costs(model, target_modules)
    uniform = rank * sum(costs)
    ranks = [rank] * len(costs)
    budget = {
        "allocation": "uniform",
        "ranks": ranks,
        "trainable_params": uniform,
        "uniform_params": uniform,
        "relative_gap": 0.0,
        "cost_per_rank": costs,
    }
    return ranks, budget


# ----------------------------------------------------------------------------- peft wiring


def build_lora_config(model: nn.Module, ranks: Sequence[int], config: RecoveryConfig):
    """A peft ``LoraConfig`` giving block ``i`` rank ``ranks[i]`` and alpha ``alpha * ranks[i] / R``.

    Targets are one regex restricted to the decoder blocks, so embeddings and the LM head never get
    adapters and the parameter count matches ``rank_unit_costs`` exactly.
    """
    from peft import LoraConfig

    prefix, blocks = decoder_blocks(model)
    if len(ranks) != len(blocks):
        raise CfspError(f"got {len(ranks)} ranks for {len(blocks)} decoder blocks")
    names = "|".join(re.escape(t) for t in config.target_modules)
    target = rf"{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{names})"
    block_key = [rf"{re.escape(f'{prefix}.{i}.')}.*" for i in range(len(blocks))]
    scale = config.lora_alpha / config.rank
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=target,
        rank_pattern={key: int(r) for key, r in zip(block_key, ranks, strict=True)},
        alpha_pattern={key: scale * int(r) for key, r in zip(block_key, ranks, strict=True)},
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, ranks: Sequence[int], config: RecoveryConfig):
    """Wrap ``model`` (in place) in a peft model with per-block ranks; only LoRA weights train."""
    from peft import get_peft_model

    return get_peft_model(model, build_lora_config(model, ranks, config))


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the weights and return the plain model (same class, widths, biases)."""
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval()


# ----------------------------------------------------------------------------- data


class RecoveryDataset(torch.utils.data.Dataset):
    """Tokenized recovery examples: ``input_ids``, ``labels`` (-100 where no loss), ``attention_mask``."""

    def __init__(self, examples: list[dict[str, list[int]]], kind: str, source: str, skipped: int = 0):
        self.examples = examples
        self.kind = kind  # "instruction" (response-only loss) or "text" (packed windows)
        self.source = source
        self.skipped = skipped  # instruction rows whose prompt alone filled seqlen

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "examples": len(self), "skipped": self.skipped}


def resolve_recovery_source(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A named recovery set (``gpteacher_roleplay``, ...) in the data directory, or a user file."""
    path = named_file(source, RECOVERY_SOURCES, "recovery data", root)
    if path.suffix not in (".jsonl", ".txt"):
        raise CfspError(f"recovery data {path} must be a .jsonl or .txt file")
    return path


def _numbered_rows(path: Path) -> list[tuple[int, dict]]:
    """JSONL rows with their line numbers (blank lines skipped, as ``read_jsonl`` does)."""
    with open(path, encoding="utf-8") as handle:
        numbers = [n for n, line in enumerate(handle, start=1) if line.strip()]
    return list(zip(numbers, read_jsonl(path), strict=False))


_FIELDS = {"alpaca": ("instruction", "output"), "prompt": ("prompt", "response"), "text": ("text",)}


def _row_format(path: Path, line: int, row: dict) -> str:
    """Which schema a JSONL file uses, judged by its first row."""
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt"
    if "text" in row:
        return "text"
    raise CfspError(
        f"{path}, line {line}: unknown row schema (fields {', '.join(sorted(row)) or 'none'}); use "
        "instruction/input/output, prompt/response or text"
    )


def _field(path: Path, line: int, row: dict, name: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise CfspError(f"{path}, line {line}: missing field {name!r}; every row needs the same fields")
        return ""
    if not isinstance(value, str):
        raise CfspError(f"{path}, line {line}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def format_instruction(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt for one instruction (with or without an input)."""
    if input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def instruction_examples(
    prompts: Sequence[str], responses: Sequence[str], tokenizer, seqlen: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Prompt + response + eos, truncated to ``seqlen``; the loss sees only response (and eos) tokens.

    Prompt and response are tokenized separately so the prompt/response boundary is exact. Rows
    whose prompt alone fills ``seqlen`` carry no loss and are skipped (their count is returned).
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, skipped = [], 0
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        if len(prompt) >= seqlen:
            skipped += 1
            continue
        ids = (list(prompt) + list(response) + eos)[:seqlen]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return examples, skipped


def text_examples(text: str, tokenizer, seqlen: int) -> list[dict[str, list[int]]]:
    """Causal-LM windows: the text tokenized once, cut into consecutive windows of ``seqlen`` tokens."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    windows = [ids[start : start + seqlen] for start in range(0, len(ids), seqlen)]
    windows = [w for w in windows if len(w) >= 2]  # a 1-token tail has nothing to predict
    return [{"input_ids": w, "labels": list(w), "attention_mask": [1] * len(w)} for w in windows]


def load_recovery_data(
    source: str | os.PathLike,
    tokenizer,
    seqlen: int = 256,
    max_samples: int | None = None,
    data_root: str | os.PathLike | None = None,
) -> RecoveryDataset:
    """Tokenize a recovery set: instruction JSONL (response-only loss) or plain text (packed windows).

    ``instruction/input/output`` rows get the Alpaca template; ``prompt/response`` rows use the
    prompt as-is; ``text`` rows (or a ``.txt`` file) are joined with blank lines and packed.
    ``max_samples`` keeps the first rows (instruction) or windows (text).
    """
    if seqlen < 2:
        raise CfspError(f"recovery seqlen must be >= 2 tokens, got {seqlen}")
    path = resolve_recovery_source(source, data_root)
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise CfspError(f"recovery data {path} is empty; give a file with text in it")
        return _text_dataset(text, tokenizer, seqlen, max_samples, path)
    rows = _numbered_rows(path)
    if not rows:
        raise CfspError(f"recovery data {path} has no rows; give a JSONL file with one object per line")
    kind = _row_format(path, *rows[0])
    for line, row in rows:
        for name in _FIELDS[kind]:
            _field(path, line, row, name)
    if kind == "text":
        text = "\n\n".join(row["text"] for _, row in rows)
        if not text.strip():
            raise CfspError(f"recovery data {path} has only empty 'text' rows")
        return _text_dataset(text, tokenizer, seqlen, max_samples, path)
    if max_samples is not None:
        rows = rows[:max_samples]
    if kind == "alpaca":
        prompts = [
            format_instruction(row["instruction"], _field(path, line, row, "input", required=False))
            for line, row in rows
        ]
        responses = [row["output"] for _, row in rows]
    else:
        prompts = [row["prompt"] for _, row in rows]
        responses = [row["response"] for _, row in rows]
    examples, skipped = instruction_examples(prompts, responses, tokenizer, seqlen)
    if not examples:
        raise CfspError(f"every prompt in {path} is at least {seqlen} tokens long; raise --seqlen")
    return RecoveryDataset(examples, "instruction", str(path), skipped)


def _text_dataset(text: str, tokenizer, seqlen: int, max_samples: int | None, path: Path) -> RecoveryDataset:
    examples = text_examples(text, tokenizer, seqlen)
    if not examples:
        raise CfspError(f"recovery text {path} has fewer than 2 tokens; give a longer text")
    return RecoveryDataset(examples[:max_samples] if max_samples else examples, "text", str(path))


class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, ``attention_mask`` with 0."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        return {
            key: torch.tensor(
                [list(f[key]) + [pad] * (width - len(f[key])) for f in features], dtype=torch.long
            )
            for key, pad in pads.items()
        }


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else eos, else 0 (masked out anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ----------------------------------------------------------------------------- training


def plan_ranks(
    model: nn.Module, block_importance: Sequence[float] | None, config: RecoveryConfig
) -> tuple[list[int], dict[str, Any]]:
    """Ranks for ``config.allocation``: importance-guided (needs importances) or uniform."""
    if config.allocation == "uniform":
        return uniform_ranks(model, config.rank, config.target_modules)
    if block_importance is None:
        raise CfspError(
            "importance allocation needs the block importances; pass them or use uniform allocation"
        )
    return allocate_ranks(block_importance, model, config.rank, config.target_modules, config.min_rank)


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
    """Train (IG-)LoRA adapters on ``data`` with the HF Trainer, merge them, return the plain model.

    ``model`` is modified in place (adapters are injected, then merged). ``data`` is a loaded
    ``RecoveryDataset`` or a source for ``load_recovery_data``. Checkpoints go to
    ``output_dir/checkpoint-N``; ``resume=True`` continues from the latest one (the same base
    model must be passed again). ``save_adapter`` also writes the adapter alone before merging.
    ``teacher``: the dense model, for ``config.objective`` ``kd`` or ``lm+kd`` (it stays on its
    own device and is never trained).
    """
    from transformers import set_seed

    from cfsp.distillation import distillation_trainer

    config = config or RecoveryConfig()
    if config.objective != "lm" and teacher is None:
        raise CfspError(f"objective {config.objective!r} needs the dense model as teacher (--teacher)")
    if save_adapter is not None:
        check_output(save_adapter)
    ranks, budget = plan_ranks(model, block_importance, config)  # cheap checks before tokenizing
    checkpoint = resume_checkpoint(output_dir, resume)
    if checkpoint is not None:
        check_checkpoint_ranks(checkpoint, build_lora_config(model, ranks, config))
    if isinstance(data, RecoveryDataset):
        dataset = data
    else:
        dataset = load_recovery_data(data, tokenizer, config.seqlen, config.max_samples, data_root)
    if len(dataset) == 0:
        raise CfspError("the recovery data set is empty; give a file with at least one example")
    set_seed(config.seed)  # LoRA A init and data order are reproducible
    peft_model = attach_lora(model, ranks, config)
    actual = count_trainable(peft_model)
    if actual != budget["trainable_params"]:
        raise RuntimeError(f"peft built {actual} trainable parameters, expected {budget['trainable_params']}")
    start = _start_step_callback()
    trainer_class = distillation_trainer(teacher, config.objective, config.kd_temperature)
    trainer = trainer_class(
        model=peft_model,
        args=training_arguments(config, output_dir, next(model.parameters()).device),
        train_dataset=dataset,
        data_collator=PadCollator(pad_id(tokenizer)),
        callbacks=[start],
    )
    output = trainer.train(resume_from_checkpoint=checkpoint)
    if save_adapter is not None:
        with StagedOutput(save_adapter) as folder:
            peft_model.save_pretrained(str(folder))
    history = list(trainer.state.log_history)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    merged = merge_lora(peft_model)
    return RecoveryResult(
        model=merged,
        ranks=list(ranks),
        trainable_params=actual,
        uniform_params=budget["uniform_params"],
        allocation=config.allocation,
        steps=trainer.state.global_step,
        start_step=start.step,
        final_loss=float(losses[-1]) if losses else None,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        log_history=history,
        resumed_from=checkpoint,
        adapter_dir=str(save_adapter) if save_adapter is not None else None,
        config=config,
        budget=budget,
    )
