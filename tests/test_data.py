"""Data directory resolution and calibration window sampling."""

import random

import pytest
import torch

import cfsp
from cfsp.data import data_dir, text_rows


def test_windows_follow_the_reference_sampling(tokenizer, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} of a small corpus" for i in range(200)))
    windows = cfsp.calibration_windows(tokenizer, source=text, n=5, length=16, seed=3)
    ids = tokenizer(" ".join(text.read_text().splitlines()), return_tensors="pt").input_ids[0]
    rng = random.Random(3)
    starts = [rng.randint(0, ids.numel() - 16 - 1) for _ in range(5)]
    assert windows.dtype == torch.long and windows.shape == (5, 16)
    assert torch.equal(windows, torch.stack([ids[s : s + 16] for s in starts]))


def test_wikitext2_calibration_uses_the_validation_split(tokenizer):
    rows = text_rows("wikitext2")
    assert len(rows) == 3760
    windows = cfsp.calibration_windows(tokenizer, n=2, length=64)
    assert windows.shape == (2, 64)


def test_jsonl_with_text_field(tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "hello there, general calibration text"}\n' * 20)
    assert cfsp.calibration_windows(tokenizer, source=path, n=1, length=8).shape == (1, 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(cfsp.CfspError, match="row 2.*'text'"):
        cfsp.calibration_windows(tokenizer, source=bad, n=1, length=8)


def test_short_text_and_missing_files_are_clear_errors(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(cfsp.CfspError, match="fewer than one window"):
        cfsp.calibration_windows(tokenizer, source=short, n=1, length=64)
    with pytest.raises(cfsp.CfspError, match="neither a known name"):
        cfsp.calibration_windows(tokenizer, source=tmp_path / "nope.txt")
    with pytest.raises(cfsp.CfspError, match="missing data file"):
        cfsp.calibration_windows(tokenizer, source="wikitext2", data_dir=tmp_path)
    with pytest.raises(cfsp.CfspError, match="does not exist"):
        data_dir(tmp_path / "absent")


def test_unknown_model_names_are_refused(tmp_path):
    with pytest.raises(cfsp.CfspError, match="not a named default"):
        cfsp.load_model("llama-9000")
    with pytest.raises(cfsp.CfspError, match="not a named default"):
        cfsp.load_model(tmp_path / "missing")


def test_the_default_data_ships_inside_the_repository(monkeypatch):
    """No environment variable and no folder beside the clone: the package finds its own data."""
    from pathlib import Path

    import cfsp
    from cfsp.data import data_dir, data_file

    monkeypatch.delenv("CFSP_DATA_DIR", raising=False)
    repository = Path(__file__).resolve().parents[1]
    resolved = data_dir()
    assert resolved.is_relative_to(repository) and resolved.is_relative_to(Path(cfsp.__file__).parent)
    for name in ("wikitext2/test.jsonl", "wikitext2/validation.jsonl", "piqa/validation.jsonl",
                 "gpteacher_roleplay/train.jsonl", "dolly_hhrlhf_small/train.jsonl"):  # fmt: skip
        assert data_file(name).stat().st_size > 10_000
    assert (resolved / "MANIFEST.md").is_file()
