"""The recovery objectives: next-token loss and/or distillation from the dense model, chunked.

After pruning, the dense original is on hand, and its next-token distribution says far more per
token than the one observed token does. ``kd`` trains the pruned student to match it (token-level
KL divergence at a temperature, scaled by T² so gradients keep their size across temperatures);
``lm+kd`` adds the usual next-token loss. Distillation counts every real (non-padding) token,
prompts included: the teacher's distribution is a target wherever there is text, while the LM loss
of instruction examples sees only the response.

Logits are never made for a whole batch at once. The models run up to their last hidden state;
the output head and the loss then go over ``chunk`` token positions at a time, and the student's
chunks are recomputed in the backward pass instead of kept. A 150k-token vocabulary at 4k tokens
would otherwise hold two fp32 tensors of 2.4 GB per sequence, and their gradients. With
``top_k`` the teacher's distribution is cut to its k most likely tokens (renormalised), the usual
sparse distillation target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cfsp.errors import CfspError
from cfsp.recovery.config import OBJECTIVES
from cfsp.recovery.data import IGNORE_INDEX


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    counted: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over counted positions of ``T² · KL(teacher_T || student_T)``; logits [B, L, V].

    The plain, unchunked definition (the chunked loss is tested against it). ``counted`` [B, L]
    marks the tokens that are targets (the attention mask, or ``labels != IGNORE_INDEX``).
    Logits at position ``t`` predict token ``t + 1``, so position ``t`` counts when token
    ``t + 1`` does (the shift the causal-LM loss applies).
    """
    if student_logits.shape != teacher_logits.shape:
        raise CfspError(
            f"student and teacher logits differ in shape ({tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}): the teacher must be the dense model of the same tokenizer"
        )
    counted = counted[:, 1:].bool()
    student = student_logits[:, :-1][counted].float() / temperature
    teacher = teacher_logits[:, :-1][counted].float() / temperature
    if student.numel() == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
    return kl.sum(-1).mean() * temperature**2


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last hidden state: the output head and any final scaling the
    family applies after it (Gemma-2's soft cap, Cohere's scale, Granite's divisor); a test checks
    every supported family against its own forward."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, int | float) and config.model_type.startswith("cohere"):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, int | float) and divisor != 1:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's output before the head, [B, L, H]."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Positions the LM loss counts (the next label is real) and those distillation counts (the
    next token is real): what the losses of a whole step are divided by."""
    return (
        int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        int(batch["attention_mask"][:, 1:].bool().sum()),
    )


class RecoveryLoss(nn.Module):
    """Student (and teacher) in one module, whose forward returns the summed token losses.

    One module, so that the distributed engines wrap both models together: FSDP shards the
    teacher's blocks like the student's and gathers both output heads in the same group. The
    forward returns sums, ``(lm, kd)``; the training loop divides them by the token counts of the
    whole step over all processes, so a step's loss does not depend on how it is split.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        objective: str = "lm",
        temperature: float = 1.0,
        top_k: int | None = None,
        chunk: int = 1024,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise CfspError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if objective != "lm" and teacher is None:
            raise CfspError(f"objective {objective!r} needs the dense model as teacher (--teacher)")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False) if objective != "lm" else None
        self.objective, self.temperature, self.top_k, self.chunk = objective, temperature, top_k, chunk

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        lm_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lm_wanted = lm_only or self.objective != "kd"
        kd_wanted = not lm_only and self.teacher is not None
        hidden = last_hidden(self.student, input_ids, attention_mask)[:, :-1]
        counted = attention_mask[:, 1:].bool() if kd_wanted else labels[:, 1:] != IGNORE_INDEX
        hidden = hidden[counted]  # [N, H]: only positions some loss counts
        targets = labels[:, 1:][counted]
        teacher_hidden = None
        if kd_wanted:
            device = next(self.teacher.parameters()).device
            with torch.no_grad():
                teacher_hidden = last_hidden(self.teacher, input_ids.to(device), attention_mask.to(device))
                teacher_hidden = teacher_hidden[:, :-1][counted.to(device)]
        lm = kd = hidden.sum() * 0.0
        for start in range(0, hidden.shape[0], self.chunk):
            piece = slice(start, start + self.chunk)
            args = (hidden[piece], targets[piece], None if teacher_hidden is None else teacher_hidden[piece])
            if hidden.shape[0] > self.chunk and torch.is_grad_enabled():  # recompute, don't keep, the logits
                part_lm, part_kd = checkpoint(self._chunk, *args, lm_wanted, use_reentrant=False)
            else:
                part_lm, part_kd = self._chunk(*args, lm_wanted)
            lm, kd = lm + part_lm, kd + part_kd
        return lm, kd

    def _chunk(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        teacher_hidden: torch.Tensor | None,
        lm_wanted: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head_logits(self.student, hidden).float()
        zero = logits.sum() * 0.0
        lm = (
            F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            if lm_wanted
            else zero
        )
        if teacher_hidden is None:
            return lm, zero
        scale = 1.0 / self.temperature
        with torch.no_grad():
            teacher = head_logits(self.teacher, teacher_hidden).to(logits.device).float()
            if self.top_k is not None:
                teacher, indices = teacher.topk(min(self.top_k, teacher.shape[-1]), dim=-1)
            teacher = F.log_softmax(teacher * scale if scale != 1 else teacher, -1)
        student = F.log_softmax(logits * scale if scale != 1 else logits, -1)
        if self.top_k is not None:
            student = student.gather(-1, indices)
        kd = F.kl_div(student, teacher, log_target=True, reduction="sum") * self.temperature**2
        return lm, kd
