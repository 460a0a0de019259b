"""IG-LoRA recovery: rank allocation at equal budget, peft wiring, data, training, merge, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_model
from torch import nn

from cfsp.errors import CfspError
from cfsp.recovery import (
    BUDGET_TOLERANCE,
    IGNORE_INDEX,
    RECOVERY_MIXES,
    PadCollator,
    RecoveryConfig,
    allocate_ranks,
    attach_lora,
    count_trainable,
    format_instruction,
    load_recovery_data,
    merge_lora,
    rank_unit_costs,
    recover,
    resolve_recovery_source,
    uniform_ranks,
)

IMPORTANCE = [0.1, 0.4, 0.2, 0.3]


WIDTHS = [256, 96, 160, 32]


def vary_widths(model: nn.Module, widths: list[int], bias_blocks: tuple[int, ...] = ()) -> nn.Module:
    """Slice each block's FFN to its own width, as pruning does; ``bias_blocks`` get a down_proj bias."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, (layer, width) in enumerate(zip(model.model.layers, widths, strict=True)):
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = nn.Linear(old.in_features, width, bias=False)
                new.weight.copy_(old.weight[:width])
                setattr(mlp, name, new)
            old = mlp.down_proj
            new = nn.Linear(width, old.out_features, bias=index in bias_blocks)
            new.weight.copy_(old.weight[:, :width])
            if new.bias is not None:
                new.bias.copy_(torch.randn(old.out_features, generator=generator) * 0.1)
            mlp.down_proj = new
    return model


def write_text(tmp_path, repeats: int = 30):
    path = tmp_path / "tiny.txt"
    path.write_text("the cat sat on the mat and the dog ran to the log. " * repeats, encoding="utf-8")
    return path


def mean_loss(model: nn.Module, dataset) -> float:
    batch = PadCollator(0)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return model(**batch).loss.item()


def small_config(**overrides) -> RecoveryConfig:
    settings = dict(steps=8, lr=1e-2, batch_size=4, grad_accum=1, seqlen=32, logging_steps=1, save_steps=100)
    settings.update(overrides)
    return RecoveryConfig(**settings)


# ----------------------------------------------------------------------------- rank allocation


@pytest.mark.parametrize("widths", [None, WIDTHS])
def test_ranks_follow_importance_at_uniform_budget(widths):
    model = make_tiny_model("llama")
    if widths:
        vary_widths(model, widths)
    costs = rank_unit_costs(model)
    assert (len(set(costs)) > 1) == bool(widths)
    ranks, budget = allocate_ranks(IMPORTANCE, model, rank=8)
    assert all(r >= 1 for r in ranks)
    by_importance = [ranks[i] for i in sorted(range(4), key=IMPORTANCE.__getitem__)]
    assert by_importance == sorted(by_importance)
    assert ranks[1] > ranks[0]
    assert budget["uniform_params"] == 8 * sum(costs)
    assert budget["trainable_params"] == sum(c * r for c, r in zip(costs, ranks, strict=True))
    assert (
        abs(budget["trainable_params"] - budget["uniform_params"])
        <= BUDGET_TOLERANCE * budget["uniform_params"]
    )


@pytest.mark.parametrize("rank", [1, 2, 3, 16])
@pytest.mark.parametrize("importance", [[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [5.0, 1.0, 3.0, 0.5]])
def test_budget_holds_for_small_ranks_and_skewed_importance(rank, importance):
    model = vary_widths(make_tiny_model("llama"), WIDTHS)
    ranks, budget = allocate_ranks(importance, model, rank=rank)
    assert min(ranks) >= 1
    assert abs(budget["relative_gap"]) <= BUDGET_TOLERANCE
    if len(set(importance)) == 1:
        assert ranks == [rank] * 4


@pytest.mark.parametrize(
    "importance", [[0.1, 0.2, 0.3], [0.1, -0.2, 0.3, 0.4], [0.0] * 4, [float("nan")] * 4]
)
def test_bad_importance_is_rejected(importance):
    with pytest.raises(CfspError):
        allocate_ranks(importance, make_tiny_model("llama"), rank=8)


# ----------------------------------------------------------------------------- peft wiring


def test_peft_trainable_count_equals_budget(family):
    model = make_tiny_model(family)
    if family == "llama":
        vary_widths(model, WIDTHS, bias_blocks=(0, 2))
    config = RecoveryConfig(rank=8)
    ranks, budget = allocate_ranks(IMPORTANCE, model, config.rank)
    peft_model = attach_lora(model, ranks, config)
    assert count_trainable(peft_model) == budget["trainable_params"]
    for index, layer in enumerate(peft_model.base_model.model.model.layers):
        for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert module.r["default"] == ranks[index]
            assert module.scaling["default"] == pytest.approx(config.lora_alpha / config.rank)
    uniform_model = make_tiny_model(family)
    if family == "llama":
        vary_widths(uniform_model, WIDTHS)
    ranks_u, budget_u = uniform_ranks(uniform_model, 8)
    assert count_trainable(attach_lora(uniform_model, ranks_u, config)) == budget_u["trainable_params"]
    assert budget_u["trainable_params"] == budget["uniform_params"]


def test_merged_logits_equal_adapter_logits():
    model = vary_widths(make_tiny_model("llama"), WIDTHS, bias_blocks=(1,))
    bias = model.model.layers[1].mlp.down_proj.bias.detach().clone()
    ranks, _ = allocate_ranks(IMPORTANCE, model, 8)
    ids = torch.randint(4, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    peft_model = attach_lora(model, ranks, RecoveryConfig())
    with torch.no_grad():  # LoRA B starts at zero; randomise it so the adapter changes the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model)
        merged_logits = merged(input_ids=ids).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert [layer.mlp.down_proj.in_features for layer in merged.model.layers] == WIDTHS
    assert torch.equal(merged.model.layers[1].mlp.down_proj.bias, bias)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter is not a no-op
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- training


def test_training_lowers_loss_and_adapter_round_trips(tmp_path):
    from peft import PeftModel

    tokenizer = make_byte_tokenizer()
    model = vary_widths(make_tiny_model("llama"), WIDTHS, bias_blocks=(3,))
    pristine = copy.deepcopy(model)
    bias = model.model.layers[3].mlp.down_proj.bias.detach().clone()
    dataset = load_recovery_data(write_text(tmp_path), tokenizer, seqlen=32)
    before = mean_loss(model, dataset)
    result = recover(
        model,
        tokenizer,
        dataset,
        IMPORTANCE,
        small_config(),
        output_dir=tmp_path / "run",
        save_adapter=tmp_path / "adapter",
    )
    after = mean_loss(result.model, dataset)
    assert after < before - 0.1
    assert result.steps == 8 and result.start_step == 0
    assert result.trainable_params == sum(
        c * r for c, r in zip(rank_unit_costs(pristine), result.ranks, strict=True)
    )
    assert abs(result.trainable_params - result.uniform_params) <= BUDGET_TOLERANCE * result.uniform_params
    assert result.final_loss is not None and len([e for e in result.log_history if "loss" in e]) == 8
    assert type(result.model) is type(pristine)
    assert torch.equal(result.model.model.layers[3].mlp.down_proj.bias, bias)
    json.dumps(result.summary())
    # The saved adapter on the untouched base model gives the merged model's logits.
    adapter_model = PeftModel.from_pretrained(pristine, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([dataset[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            result.model(input_ids=ids).logits, adapter_model(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_resume_continues_from_latest_checkpoint(tmp_path):
    tokenizer = make_byte_tokenizer()
    dataset = load_recovery_data(write_text(tmp_path), tokenizer, seqlen=32)
    out = tmp_path / "run"
    with pytest.raises(CfspError, match="no checkpoint"):
        recover(make_tiny_model("llama"), tokenizer, dataset, IMPORTANCE, small_config(), out, resume=True)
    first = recover(
        make_tiny_model("llama"), tokenizer, dataset, IMPORTANCE, small_config(steps=4, save_steps=2), out
    )
    assert first.steps == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    with pytest.raises(CfspError, match="other LoRA ranks"):
        recover(
            make_tiny_model("llama"),
            tokenizer,
            dataset,
            None,
            small_config(allocation="uniform"),
            out,
            resume=True,
        )
    with pytest.raises(CfspError, match="already holds checkpoints"):
        recover(make_tiny_model("llama"), tokenizer, dataset, IMPORTANCE, small_config(steps=6), out)
    second = recover(
        make_tiny_model("llama"),
        tokenizer,
        dataset,
        IMPORTANCE,
        small_config(steps=6, save_steps=2),
        out,
        resume=True,
    )
    assert second.resumed_from.endswith("checkpoint-4")
    assert second.start_step == 4 and second.steps == 6
    logged = [e["step"] for e in second.log_history if "loss" in e]
    assert logged == [1, 2, 3, 4, 5, 6]  # steps 1-4 come from the checkpoint's state
    first_losses = [e["loss"] for e in first.log_history if "loss" in e]
    assert [e["loss"] for e in second.log_history if "loss" in e][:4] == first_losses


# ----------------------------------------------------------------------------- data


def write_jsonl(path, rows: list) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


def test_response_only_loss_masking(tmp_path):
    tokenizer = make_byte_tokenizer()
    path = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
    ]
    write_jsonl(path, rows)
    dataset = load_recovery_data(path, tokenizer, seqlen=512)
    assert dataset.kind == "instruction" and len(dataset) == 2
    for row, example in zip(rows, dataset.examples, strict=True):
        prompt = format_instruction(row["instruction"], row["input"])
        assert ("### Input:" in prompt) == bool(row["input"])
        n_prompt = len(tokenizer(prompt)["input_ids"])
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert example["labels"][n_prompt:] == response == example["input_ids"][n_prompt:]
    batch = PadCollator(0)(dataset.examples)
    short = min(range(2), key=lambda i: len(dataset[i]["input_ids"]))
    n = len(dataset[short]["input_ids"])
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all() and (
        batch["attention_mask"][short, n:] == 0
    ).all()
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_prompt_response_rows_use_prompt_as_is(tmp_path):
    tokenizer = make_byte_tokenizer()
    path = tmp_path / "pr.jsonl"
    prompt = "### Instruction:\nName a colour.\n\n### Response:\n"
    write_jsonl(path, [{"prompt": prompt, "response": "Blue."}])
    (example,) = load_recovery_data(path, tokenizer, seqlen=512).examples
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert tokenizer.decode(example["input_ids"][:n_prompt]) == prompt
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    # Truncation keeps the prompt and cuts the response; a prompt that fills seqlen is skipped.
    assert (
        len(load_recovery_data(path, tokenizer, seqlen=n_prompt + 2).examples[0]["input_ids"]) == n_prompt + 2
    )
    with pytest.raises(CfspError, match="raise --seqlen"):
        load_recovery_data(path, tokenizer, seqlen=n_prompt)


def test_text_is_packed_into_windows(tmp_path):
    tokenizer = make_byte_tokenizer()
    path = tmp_path / "text.jsonl"
    write_jsonl(path, [{"text": "a" * 50}, {"text": "b" * 50}])
    dataset = load_recovery_data(path, tokenizer, seqlen=32)
    assert dataset.kind == "text"
    assert [len(e["input_ids"]) for e in dataset.examples] == [32, 32, 32, 6]  # 102 tokens
    assert all(e["labels"] == e["input_ids"] for e in dataset.examples)
    assert len(load_recovery_data(path, tokenizer, seqlen=32, max_samples=2)) == 2


def test_bad_recovery_data_is_reported(tmp_path):
    tokenizer = make_byte_tokenizer()
    path = tmp_path / "bad.jsonl"
    write_jsonl(
        path, [{"instruction": "a", "input": "", "output": "b"}, "", {"instruction": "c", "input": ""}]
    )
    with pytest.raises(CfspError, match=r"line 3: missing field 'output'"):
        load_recovery_data(path, tokenizer)
    write_jsonl(path, [{"prompt": "a", "response": "b"}, "{not json"])
    with pytest.raises(CfspError, match="line 2"):
        load_recovery_data(path, tokenizer)
    write_jsonl(path, [{"question": "a"}])
    with pytest.raises(CfspError, match="unknown row schema"):
        load_recovery_data(path, tokenizer)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(CfspError, match="no rows"):
        load_recovery_data(path, tokenizer)
    with pytest.raises(CfspError, match="neither a known name"):
        load_recovery_data(tmp_path / "missing.jsonl", tokenizer)


def test_named_sources_resolve():
    tokenizer = make_byte_tokenizer()
    dolly = load_recovery_data("dolly_hhrlhf_small", tokenizer, seqlen=512, max_samples=3)
    roleplay = load_recovery_data("gpteacher_roleplay", tokenizer, seqlen=1024, max_samples=3)
    assert dolly.kind == roleplay.kind == "instruction" and len(dolly) + dolly.skipped == 3
    assert len(roleplay) + roleplay.skipped == 3
    assert load_recovery_data("wikitext2", tokenizer, seqlen=64, max_samples=2).kind == "text"


def test_config_validation():
    with pytest.raises(CfspError):
        RecoveryConfig(allocation="random")
    with pytest.raises(CfspError):
        RecoveryConfig(rank=2, min_rank=4)
    assert RecoveryConfig(rank=4).lora_alpha == 8.0
    with pytest.raises(CfspError, match="needs the block importances"):
        recover(make_tiny_model("llama"), make_byte_tokenizer(), "unused", None, RecoveryConfig(), "x")


def test_the_instruction_mix_joins_both_sets():
    tokenizer = make_byte_tokenizer()
    paths = resolve_recovery_source("instructions")
    assert [p.parent.name for p in paths] == ["gpteacher_roleplay", "dolly_hhrlhf_small"]
    mix = load_recovery_data("instructions", tokenizer, seqlen=1024, max_samples=3)
    parts = [
        load_recovery_data(name, tokenizer, seqlen=1024, max_samples=3)
        for name in RECOVERY_MIXES["instructions"]
    ]
    assert mix.examples == parts[0].examples + parts[1].examples
    assert (
        mix.kind == "instruction"
        and "gpteacher_roleplay" in mix.source
        and "dolly_hhrlhf_small" in mix.source
    )


# ----------------------------------------------------------------------------- MLP fine-tuning


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mlp_training_changes_only_the_mlp_weights(family, tmp_path):
    tokenizer = make_byte_tokenizer()
    model = vary_widths(make_tiny_model(family), WIDTHS, bias_blocks=(3,))
    pristine = copy.deepcopy(model)
    dataset = load_recovery_data(write_text(tmp_path), tokenizer, seqlen=32)
    before = mean_loss(model, dataset)
    result = recover(model, tokenizer, dataset, None, small_config(train="mlp", lr=1e-3), tmp_path / "run")
    assert mean_loss(result.model, dataset) < before - 0.1
    mlp_params = sum(p.numel() for layer in pristine.model.layers for p in layer.mlp.parameters())
    assert result.trainable_params == mlp_params and result.ranks == [] and result.allocation == "none"
    assert (
        8 * 4 * 31 < result.tokens_seen <= 8 * 4 * 32
    )  # 8 steps of 4 windows of 32 tokens (one may be short)
    changed = {
        name
        for (name, new), old in zip(result.model.named_parameters(), pristine.parameters(), strict=True)
        if not torch.equal(new, old)
    }
    assert changed and all(".mlp." in name for name in changed)
    assert any(name.endswith("down_proj.bias") for name in changed)  # the compensation bias trains too
    assert type(result.model) is type(pristine) and not any(
        p.requires_grad for p in result.model.parameters()
    )
    assert result.summary()["train"] == "mlp" and result.train_seconds > 0
    with pytest.raises(CfspError, match="no adapter"):
        recover(
            pristine,
            tokenizer,
            dataset,
            None,
            small_config(train="mlp"),
            tmp_path / "r2",
            save_adapter=tmp_path / "a",
        )
    with pytest.raises(CfspError, match="unknown --train"):
        small_config(train="full")
