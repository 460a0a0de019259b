"""Distillation from the dense model: the recovery objective that needs no labels beyond the text.

After pruning, the dense original is on hand, and its next-token distribution says far more per
token than the one observed token does. ``kd`` trains the pruned student to match it (token-level
KL divergence at a temperature, scaled by T² so gradients keep their size across temperatures);
``lm+kd`` adds the usual next-token loss. Distillation counts every real (non-padding) token,
prompts included: the teacher's distribution is a target wherever there is text, while the LM loss
of instruction examples sees only the response.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cfsp.errors import CfspError
from cfsp.recovery.config import OBJECTIVES


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    counted: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over counted positions of ``T² · KL(teacher_T || student_T)``; logits [B, L, V].

    ``counted`` [B, L] marks the tokens that are targets (the attention mask, or ``labels !=
    IGNORE_INDEX``). Logits at position ``t`` predict token ``t + 1``, so position ``t`` counts
    when token ``t + 1`` does (the shift the causal-LM loss applies).
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


def distillation_trainer(teacher: nn.Module | None, objective: str, temperature: float):
    """A ``transformers.Trainer`` subclass whose loss is ``objective`` against the frozen ``teacher``."""
    from transformers import Trainer

    if objective not in OBJECTIVES:
        raise CfspError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    class DistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            outputs = model(**inputs)
            if objective == "lm":
                return (outputs.loss, outputs) if return_outputs else outputs.loss
            device = next(teacher.parameters()).device
            with torch.no_grad():
                teacher_logits = teacher(
                    input_ids=inputs["input_ids"].to(device),
                    attention_mask=inputs["attention_mask"].to(device),
                ).logits.to(outputs.logits.device)
            loss = kd_loss(outputs.logits, teacher_logits, inputs["attention_mask"], temperature)
            if objective == "lm+kd":
                loss = loss + outputs.loss
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer
