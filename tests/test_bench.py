"""Speed benchmark, parameter counts, on-disk size and pruning-cost helpers on tiny models."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import COMMON, FAMILY_CONFIGS, make_tiny_model
from rich.console import Console
from transformers import AutoModelForCausalLM

from cfsp.errors import CfspError
from cfsp.memory import pruning_cost
from cfsp.speed import (
    count_parameters,
    format_bench_table,
    forward_pass_seconds,
    greedy_decode,
    size_on_disk,
    speed_benchmark,
)


def _narrow_llama(intermediate_size: int = 128) -> torch.nn.Module:
    """A tiny llama with a narrower FFN, standing in for a pruned model."""
    config = FAMILY_CONFIGS["llama"]()
    config.intermediate_size = intermediate_size
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_speed_benchmark_on_dense_and_narrow_model(tokenizer):
    dense, pruned = make_tiny_model("llama"), _narrow_llama()
    result = speed_benchmark(
        dense, pruned, tokenizer, batch_sizes=(1, 2), prompt_lengths=(8, 16), decode_tokens=3, repeats=2
    )
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        for name in ("dense", "pruned"):
            assert all(value > 0 for value in row[name].values())
        ratio = row["pruned"]["decode_tokens_per_s"] / row["dense"]["decode_tokens_per_s"]
        assert row["decode_speedup"] == pytest.approx(ratio)
        assert row["prefill_speedup"] > 0
    assert result["dense_params"] == count_parameters(dense)
    assert result["pruned_params"] == count_parameters(pruned)
    removed = 3 * COMMON["hidden_size"] * (COMMON["intermediate_size"] - 128) * COMMON["num_hidden_layers"]
    assert result["dense_params"] - result["pruned_params"] == removed
    assert result["param_ceiling"] > 1
    hidden, vocab = COMMON["hidden_size"], COMMON["vocab_size"]
    untied = [count_parameters(m) - vocab * hidden + hidden for m in (dense, pruned)]  # one embedding row
    assert result["decode_ceiling"] == pytest.approx(untied[0] / untied[1])
    assert result["decode_ceiling"] > result["param_ceiling"]
    json.dumps(result)
    console = Console(record=True, width=160)
    console.print(format_bench_table(result))
    assert "ceiling" in console.export_text()


def test_speed_benchmark_rejects_prompts_beyond_the_context():
    model = make_tiny_model("llama")
    with pytest.raises(CfspError, match="positions"):
        speed_benchmark(model, model, prompt_lengths=(COMMON["max_position_embeddings"],), decode_tokens=2)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: prompt longer than its sliding window
def test_greedy_decode_matches_recomputation_without_cache(family):
    model = make_tiny_model(family)
    prompt = torch.randint(4, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    ids, prefill, decode = greedy_decode(model, prompt, steps=5)
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            token = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, token], dim=1)
    assert torch.equal(ids, expected[:, 12:])
    assert prefill > 0 and decode > 0


def test_count_parameters_matches_numel():
    model = make_tiny_model("qwen2")
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_size_on_disk(tmp_path):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    assert size_on_disk(tmp_path / "model") == weights.stat().st_size
    assert size_on_disk(weights) == weights.stat().st_size
    assert size_on_disk(weights) >= 4 * count_parameters(model)  # float32
    with pytest.raises(CfspError):
        size_on_disk(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CfspError, match="no weight files"):
        size_on_disk(tmp_path / "empty")


def test_pruning_cost_reports_time_and_memory():
    def work(megabytes: int, pause: float) -> int:
        block = torch.ones(megabytes * 2**20 // 4)  # float32, touched so it is resident
        time.sleep(pause)
        return int(block.numel())

    result, cost = pruning_cost(work, 64, pause=0.1)
    assert result == 64 * 2**20 // 4
    assert cost["seconds"] >= 0.1
    assert cost["rss_increase_bytes"] >= 32 * 2**20
    assert cost["peak_rss_bytes"] > 0


def test_forward_pass_seconds(calib):
    model = make_tiny_model("llama")
    assert forward_pass_seconds(model, calib, batch_size=4) > 0
    with pytest.raises(CfspError):
        forward_pass_seconds(model, calib[0], batch_size=4)
