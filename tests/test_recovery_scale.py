"""Recovery at scale, in one process: streamed corpus folders, the global batch, chunked losses."""

import copy
import json
import logging

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_model
from real_models import REAL_CONFIGS, make_real_model

from cfsp.errors import CfspError
from cfsp.recovery import (
    IGNORE_INDEX,
    PadCollator,
    RecoveryConfig,
    RecoveryLoss,
    TextStream,
    global_examples,
    kd_loss,
    plan_batch,
    rank_batches,
    recover,
    train_block_weights,
)
from cfsp.recovery.distillation import head_logits, token_counts


def write_corpus(folder, broken: bool = False):
    """Three shard formats; ``broken`` adds a line that is not JSON and one without text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"text": f"doc {i} about cats."}) for i in range(6)]
    if broken:
        rows[2:2] = ["{not json", json.dumps({"title": "no text"})]
    (folder / "1.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "2.txt").write_text("a text shard on trees.")
    pq.write_table(pa.table({"text": ["parquet row one.", "parquet row two."]}), folder / "3.parquet")
    return folder


def stream_text(stream: TextStream, tokenizer) -> str:
    """Every token of one pass, decoded: what the stream packs, in order."""
    ids = [i for window in stream._one_pass() for i in window["input_ids"]]
    return tokenizer.decode(ids)


def test_a_folder_of_mixed_shards_streams_in_path_order(tmp_path):
    tokenizer = make_byte_tokenizer()
    stream = TextStream(write_corpus(tmp_path / "c"), tokenizer, seqlen=8)
    windows = list(stream._one_pass())
    assert all(len(w["input_ids"]) == 8 and w["labels"] == w["input_ids"] for w in windows)
    text = stream_text(TextStream(tmp_path / "c", tokenizer, seqlen=1), tokenizer)
    expected = [f"doc {i} about cats." for i in range(6)] + [
        "a text shard on trees.",
        "parquet row one.",
        "parquet row two.",
    ]
    assert text == "".join(doc + "</s>" for doc in expected)  # documents end with the eos token
    assert stream.skipped == 0


def test_a_saved_datasets_directory_streams(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["first document.", "second document."]}).save_to_disk(
        tmp_path / "ds"
    )
    tokenizer = make_byte_tokenizer()
    assert stream_text(TextStream(tmp_path / "ds", tokenizer, seqlen=1), tokenizer) == (
        "first document.</s>second document.</s>"
    )


def test_bad_lines_are_skipped_and_counted_with_file_and_line(tmp_path, caplog):
    tokenizer = make_byte_tokenizer()
    stream = TextStream(write_corpus(tmp_path / "c", broken=True), tokenizer, seqlen=8)
    with caplog.at_level(logging.WARNING, logger="cfsp"):
        list(stream._one_pass())
    assert stream.skipped == 2
    assert f"{tmp_path / 'c' / '1.jsonl'}, line 3: not valid JSON" in caplog.text
    assert "line 4: no string 'text' field" in caplog.text
    assert stream.describe()["skipped"] == 2


def test_empty_or_unreadable_folders_fail_at_once(tmp_path):
    tokenizer = make_byte_tokenizer()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CfspError, match="has no .jsonl, .txt, .parquet files"):
        TextStream(tmp_path / "empty", tokenizer, 8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jsonl").write_text('{"title": "x"}\nnot json\n')
    with pytest.raises(CfspError, match="holds no readable text"):
        TextStream(tmp_path / "junk", tokenizer, 8, quiet=True)
    with pytest.raises(CfspError, match="does not exist"):
        TextStream(tmp_path / "missing", tokenizer, 8)


def test_ranks_get_disjoint_windows_that_together_are_the_one_process_order(tmp_path):
    tokenizer = make_byte_tokenizer()
    stream = TextStream(write_corpus(tmp_path / "c"), tokenizer, seqlen=16, held_out=3)
    collate = PadCollator(0)
    first_pass = [w["input_ids"] for w in stream._one_pass()]
    assert [w["input_ids"] for w in stream.held_out_examples()] == first_pass[:3]
    one = rank_batches(global_examples(stream, 0, 3, 0), 0, 1, 2, collate)
    single = torch.cat([next(one)["input_ids"] for _ in range(12)])  # 24 windows, more than one pass
    trained = len(first_pass) - 3
    assert trained < 12  # the stream starts a second pass within the 24 windows
    assert single[:trained].tolist() == first_pass[3:] == single[trained : 2 * trained].tolist()
    positions = [list(range(g * 2, g * 2 + 2)) for g in range(12)]  # window positions of each group
    per_rank = [rank_batches(global_examples(stream, 0, 3, 0), r, 2, 2, collate) for r in (0, 1)]
    taken = {0: [], 1: []}
    for m in range(6):  # micro-batch m of rank r is group m * 2 + r of the one-process order
        for r in (0, 1):
            assert torch.equal(next(per_rank[r])["input_ids"], single[(m * 2 + r) * 2 : (m * 2 + r) * 2 + 2])
            taken[r] += positions[m * 2 + r]
    assert not set(taken[0]) & set(taken[1]) and sorted(taken[0] + taken[1]) == list(range(24))


def test_a_loaded_set_is_shuffled_per_pass_and_holds_its_first_examples_back():
    data = [{"input_ids": [i, i], "labels": [i, i], "attention_mask": [1, 1]} for i in range(10)]
    from cfsp.recovery import RecoveryDataset

    order = [
        e["input_ids"][0]
        for _, e in zip(range(24), global_examples(RecoveryDataset(data, "text", "x"), 5, 2, 0), strict=False)
    ]
    assert sorted(order[:8]) == sorted(order[8:16]) == list(range(2, 10)) and order[:8] != order[8:16]
    later = [
        e["input_ids"][0]
        for _, e in zip(
            range(10), global_examples(RecoveryDataset(data, "text", "x"), 5, 2, 14), strict=False
        )
    ]
    assert later == order[14:24]  # a resumed position continues the same order


def test_the_global_batch_in_tokens_sets_accumulation_and_the_budget_sets_steps():
    config = RecoveryConfig(batch_size=2, seqlen=64, batch_tokens=1024, max_tokens=10_000)
    assert plan_batch(config, 1) == (8, 10) and plan_batch(config, 4) == (2, 10)
    with pytest.raises(CfspError, match="not a multiple of batch size x seqlen x processes"):
        plan_batch(config, 3)
    assert plan_batch(RecoveryConfig(steps=7, grad_accum=3), 2) == (3, 7)
    with pytest.raises(CfspError, match="max_tokens must be >= 1"):
        RecoveryConfig(max_tokens=0)


# ----------------------------------------------------------------------------- the chunked loss


def _batch(tokenizer, texts, seqlen=24):
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:seqlen]
        rows.append(
            {"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:], "attention_mask": [1] * len(ids)}
        )
    return PadCollator(0)(rows)


@pytest.mark.parametrize("objective", ["lm", "kd", "lm+kd"])
def test_chunked_losses_and_gradients_equal_the_whole_logits(objective):
    tokenizer = make_byte_tokenizer()
    teacher = make_tiny_model("llama", seed=1)
    student = make_tiny_model("llama", seed=2)
    batch = _batch(tokenizer, ["the cat sat on the mat today", "a dog"])
    whole = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = 0.0
    if objective != "kd":
        reference = reference + torch.nn.functional.cross_entropy(
            whole[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
    if objective != "lm":
        reference = reference + kd_loss(whole, t, batch["attention_mask"], 2.0)
    reference.backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    lm_count, kd_count = token_counts(batch)
    lm, kd = RecoveryLoss(student, teacher, objective, temperature=2.0, chunk=5)(**batch)
    loss = lm / lm_count + kd / kd_count
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    loss.backward()
    for got, want in zip((p.grad for p in student.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_top_k_distillation_renormalises_the_teachers_best_tokens():
    tokenizer = make_byte_tokenizer()
    teacher, student = make_tiny_model("llama", seed=1), make_tiny_model("llama", seed=2)
    batch = _batch(tokenizer, ["the cat sat on the mat"])
    vocab = teacher.config.vocab_size
    with torch.no_grad():
        full = RecoveryLoss(student, teacher, "kd", chunk=4)(**batch)[1]
        all_tokens = RecoveryLoss(student, teacher, "kd", top_k=vocab, chunk=4)(**batch)[1]
        top = RecoveryLoss(student, teacher, "kd", top_k=3)(**batch)[1]
        hidden = student.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state[0, :-1]
        t_hidden = teacher.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state[0, :-1]
        t_values, index = head_logits(teacher, t_hidden).topk(3, -1)
        p = t_values.softmax(-1)
        q = head_logits(student, hidden).log_softmax(-1).gather(-1, index)
        expected = (p * (p.log() - q)).sum()
    torch.testing.assert_close(all_tokens, full, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(top, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.families
@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_the_head_gives_every_familys_own_logits(name):
    model = make_real_model(name).eval()
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(
            head_logits(model, hidden), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_training_all_block_weights_leaves_embeddings_and_head_alone(tmp_path):
    tokenizer = make_byte_tokenizer()
    model = make_tiny_model("llama")
    budget = train_block_weights(copy.deepcopy(model), "all")
    assert budget["trainable_params"] == sum(p.numel() for p in model.model.layers.parameters())
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran. " * 20)
    before = copy.deepcopy(model)
    config = RecoveryConfig(train="all", steps=2, batch_size=2, grad_accum=1, seqlen=32, save_steps=10)
    result = recover(model, tokenizer, text, None, config, tmp_path / "run")
    assert torch.equal(result.model.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert not torch.equal(
        result.model.model.layers[0].self_attn.q_proj.weight, before.model.layers[0].self_attn.q_proj.weight
    )
    assert result.summary()["train"] == "all"


def test_held_out_loss_is_reported_every_n_steps(tmp_path):
    tokenizer = make_byte_tokenizer()
    corpus = write_corpus(tmp_path / "c")
    config = RecoveryConfig(
        steps=4, batch_size=2, grad_accum=1, seqlen=8, eval_steps=2, eval_windows=2, save_steps=10
    )
    result = recover(make_tiny_model("llama"), tokenizer, corpus, [1.0] * 4, config, tmp_path / "run")
    evals = [(e["step"], e["tokens"]) for e in result.log_history if "eval_loss" in e]
    assert evals == [(0, 0), (2, 32), (4, 64)]
    assert result.summary()["data"]["kind"] == "stream"
