"""Distillation from the dense model: the loss itself, and recovery with it on a tiny model."""

import copy

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_model
from test_recovery import IMPORTANCE, small_config, vary_widths, write_text

from cfsp.errors import CfspError
from cfsp.recovery import (
    IGNORE_INDEX,
    PadCollator,
    RecoveryConfig,
    RecoveryLoss,
    kd_loss,
    load_recovery_data,
    recover,
)
from cfsp.recovery.distillation import token_counts


def test_kd_of_a_student_equal_to_its_teacher_is_zero_with_zero_gradient():
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    student = logits.clone().requires_grad_(True)
    labels = torch.randint(0, 11, (2, 6))
    for temperature in (1.0, 2.0):
        loss = kd_loss(student, logits, labels != IGNORE_INDEX, temperature)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0 and grad.abs().max().item() < 1e-7  # float32 softmax round-off


def test_kd_counts_only_positions_whose_next_label_counts():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 5, 7, generator=gen), torch.randn(1, 5, 7, generator=gen)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX]])
    expected = (
        torch.nn.functional.kl_div(
            student[0, 1:3].log_softmax(-1), teacher[0, 1:3].log_softmax(-1), log_target=True, reduction="sum"
        )
        / 2
    )
    assert kd_loss(student, teacher, labels != IGNORE_INDEX).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    with pytest.raises(CfspError, match="differ in shape"):
        kd_loss(student, teacher[..., :5], labels != IGNORE_INDEX)


def _objective(student, teacher, dataset, objective: str) -> float:
    """The recovery objective over the whole (tiny) data set, at temperature 2 as trained."""
    batch = PadCollator(0)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        out = student(**batch)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd = kd_loss(out.logits, t, batch["attention_mask"], temperature=2.0).item()
    return kd + out.loss.item() if objective == "lm+kd" else kd


@pytest.mark.parametrize("objective", ["kd", "lm+kd"])
def test_recovery_lowers_its_distillation_objective(objective, tmp_path):
    tokenizer = make_byte_tokenizer()
    teacher = make_tiny_model("llama")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # peaked predictions, so that pruning moves them visibly
    student = vary_widths(copy.deepcopy(teacher), [32, 32, 32, 32])
    frozen = [p.detach().clone() for p in teacher.parameters()]
    dataset = load_recovery_data(write_text(tmp_path), tokenizer, seqlen=32)
    before = _objective(student, teacher, dataset, objective)
    result = recover(
        student,
        tokenizer,
        dataset,
        IMPORTANCE,
        small_config(objective=objective, kd_temperature=2.0, lr=1e-3, steps=30),
        output_dir=tmp_path / "run",
        teacher=teacher,
    )
    assert _objective(result.model, teacher, dataset, objective) < 0.7 * before
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters(), strict=True))
    assert result.summary()["config"]["objective"] == objective


def test_distillation_needs_a_teacher_and_valid_settings(tmp_path):
    tokenizer = make_byte_tokenizer()
    dataset = load_recovery_data(write_text(tmp_path), tokenizer, seqlen=32)
    with pytest.raises(CfspError, match="needs the dense model as teacher"):
        recover(
            make_tiny_model("llama"), tokenizer, dataset, IMPORTANCE, small_config(objective="kd"), tmp_path
        )
    with pytest.raises(CfspError, match="unknown objective"):
        RecoveryConfig(objective="dpo")
    with pytest.raises(CfspError, match="kd_temperature must be > 0"):
        RecoveryConfig(objective="kd", kd_temperature=0.0)


def test_distillation_counts_prompt_tokens_too(tmp_path):
    """The LM loss of an instruction example sees only the response; distillation sees every real token."""
    tokenizer = make_byte_tokenizer()
    teacher = make_tiny_model("llama")
    student = vary_widths(copy.deepcopy(teacher), [32, 32, 32, 32])
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"prompt": "say hello to the cat", "response": "hello cat"}\n{"prompt": "a", "response": "bcd"}\n'
    )
    batch = PadCollator(0)(list(load_recovery_data(path, tokenizer, seqlen=64).examples))
    assert (batch["labels"] == IGNORE_INDEX).sum() > (
        batch["attention_mask"] == 0
    ).sum()  # prompts are masked
    with torch.no_grad():
        _, kd_sum = RecoveryLoss(student, teacher, "kd", chunk=7)(**batch)
        s, t = student(**batch).logits, teacher(input_ids=batch["input_ids"]).logits
    loss = kd_sum / token_counts(batch)[1]
    assert loss.item() == pytest.approx(kd_loss(s, t, batch["attention_mask"]).item(), rel=1e-5)
    assert loss.item() != pytest.approx(kd_loss(s, t, batch["labels"] != IGNORE_INDEX).item(), rel=1e-3)


@pytest.mark.parametrize("train", ["lora", "mlp"])
def test_resume_with_distillation_repeats_the_uninterrupted_run(train, tmp_path):
    tokenizer = make_byte_tokenizer()
    teacher = make_tiny_model("llama")
    dataset = load_recovery_data(write_text(tmp_path), tokenizer, seqlen=32)
    # A constant rate, so that the 4-step run is the first part of the 6-step one.
    settings = dict(objective="lm+kd", train=train, lr=1e-3, save_steps=2, lr_scheduler="constant")

    def run(steps: int, out, resume: bool = False):
        student = vary_widths(copy.deepcopy(teacher), [32, 32, 32, 32])
        config = small_config(steps=steps, **settings)
        return recover(student, tokenizer, dataset, IMPORTANCE, config, out, resume=resume, teacher=teacher)

    whole = run(6, tmp_path / "whole")
    run(4, tmp_path / "split")
    resumed = run(6, tmp_path / "split", resume=True)
    assert resumed.resumed_from.endswith("checkpoint-4") and resumed.start_step == 4 and resumed.steps == 6
    losses = [[e["loss"] for e in r.log_history if "loss" in e] for r in (whole, resumed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert resumed.tokens_seen == whole.tokens_seen
    ids = torch.tensor([dataset[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            resumed.model(input_ids=ids).logits, whole.model(input_ids=ids).logits, atol=1e-4, rtol=0
        )


def test_teacher_and_student_stay_on_their_devices(tmp_path):
    """The teacher gets its inputs on its own device; neither model is moved by training."""
    tokenizer = make_byte_tokenizer()
    teacher = make_tiny_model("llama")
    student = vary_widths(copy.deepcopy(teacher), [32, 32, 32, 32])
    devices = {
        "teacher": [p.device for p in teacher.parameters()],
        "student": next(student.parameters()).device,
    }
    seen = []
    teacher.get_decoder().register_forward_pre_hook(  # the teacher runs to its last hidden state
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].device), with_kwargs=True
    )
    dataset = load_recovery_data(write_text(tmp_path), tokenizer, seqlen=32)
    result = recover(
        student,
        tokenizer,
        dataset,
        IMPORTANCE,
        small_config(objective="kd", steps=2),
        tmp_path / "run",
        teacher=teacher,
    )
    assert len(seen) == 2 and all(d == devices["teacher"][0] for d in seen)
    assert [p.device for p in teacher.parameters()] == devices["teacher"]
    assert all(p.device == devices["student"] for p in result.model.parameters())
