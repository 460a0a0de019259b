"""The command line as a user drives it: real processes, bad inputs, signals and concurrent runs.

Every bad input must end with exit code 2, exactly one ``error:`` line and no traceback, and leave
the directory it ran in exactly as it was (no new entries, no hidden ones, no changed bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_model

pytestmark = pytest.mark.cli
CFSP = [sys.executable, "-m", "cfsp.cli"]
FAST = ["--calib-source", "corpus.txt", "--nsamples", "4", "--seqlen", "32", "--multiple", "32"]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry below ``root`` (hidden ones too) with a hash of its bytes or its kind."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        entries[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return entries


def run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*CFSP, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=240, **kwargs
    )


def _default_signals() -> None:
    """A background job inherits SIGINT ignored; a user's terminal run does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [*CFSP, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_default_signals,
    )


def error_lines(done) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Read-only inputs: a tiny model, broken copies of it, a cfsp output, a corpus, a foreign folder."""
    root = tmp_path_factory.mktemp("inputs")
    model = root / "tiny"
    make_tiny_model("llama").save_pretrained(model)
    make_byte_tokenizer().save_pretrained(model)
    other = root / "qwen"
    make_tiny_model("qwen2").save_pretrained(other)
    make_byte_tokenizer().save_pretrained(other)
    (root / "corpus.txt").write_text("\n".join(f"sentence number {i} for calibration" for i in range(300)))

    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    mismatched = root / "mismatched"
    shutil.copytree(model, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("just notes")

    done = run(["prune", "--model", "tiny", "--out", "pruned", *FAST], root)
    assert done.returncode == 0, done.stderr
    pruned = root / "pruned"
    for name, edit in {
        "bad-plan": lambda p: p.write_text("{not json"),
        "incomplete-plan": lambda p: p.write_text(
            json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "kept_channels"})
        ),
        "no-plan": lambda p: p.unlink(),
    }.items():
        shutil.copytree(pruned, root / name)
        edit(root / name / "pruning_plan.json")
    (root / "empty-data").mkdir()
    return root


def _bad_inputs(inputs: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a phrase of the expected message); paths are relative to a fresh cwd."""
    i = str(inputs)
    model = ["--model", f"{i}/tiny", *[a.replace("corpus.txt", f"{i}/corpus.txt") for a in FAST]]
    prune = ["prune", *model]
    cases = {
        "out is the current directory": ([*prune, "--out", ".", "--overwrite"], "current directory"),
        "out is a parent of the cwd": ([*prune, "--out", "..", "--overwrite"], "current directory"),
        "out is the input model": ([*prune, "--out", f"{i}/tiny", "--overwrite"], "the input"),
        "out is a parent of the input": ([*prune, "--out", i, "--overwrite"], "the input"),
        "overwrite a foreign folder": ([*prune, "--out", "mine", "--overwrite"], "not written by cfsp"),
        "non-empty out": ([*prune, "--out", "mine"], "not empty"),
        "out under a file": ([*prune, "--out", "mine/notes.txt/x"], "is a file"),
        "out is a file": ([*prune, "--out", "mine/notes.txt", "--overwrite"], "existing file"),
        "multiple wider than the FFN": (
            [*prune, "--out", "o", "--multiple", "512"],
            "not below the FFN width",
        ),
        "sparsity beyond a narrow FFN": (
            [*prune, "--out", "o", "--multiple", "128", "--sparsity", "0.9"],
            "achievable range is 0.000-0.500",
        ),
        "sparsity outside (0, 1)": ([*prune, "--out", "o", "--sparsity", "1.2"], "sparsity must be in"),
        "batch size 0": (
            [*prune, "--out", "o", "--batch-size", "0"],
            "batch_size must be a whole number >= 1",
        ),
        "temperature nan": ([*prune, "--out", "o", "--temperature", "nan"], "temperature must be a finite"),
        "c nan": ([*prune, "--out", "o", "--c", "nan"], "activation_exponent (c) must be a finite"),
        "sparsity inf": ([*prune, "--out", "o", "--sparsity", "inf"], "sparsity must be a finite"),
        "unknown channel metric": (
            [*prune, "--out", "o", "--channel-metric", "foo"],
            "unknown channel metric",
        ),
        "unknown method": ([*prune, "--out", "o", "--method", "obc"], "unknown method"),
        "missing calibration file": (
            ["prune", "--model", f"{i}/tiny", "--out", "o", "--calib-source", "nope.txt"],
            "neither a known name",
        ),
        "directory that is not a model": (
            ["prune", "--model", f"{i}/not-a-model", "--out", "o"],
            "not a model directory",
        ),
        "truncated safetensors": (
            [*prune, "--model", f"{i}/truncated", "--out", "o"],
            "truncated or corrupt",
        ),
        "config widths differ from weights": (
            [*prune, "--model", f"{i}/mismatched", "--out", "o"],
            "do not match the shapes in config.json",
        ),
        "invalid plan": (["eval", f"{i}/bad-plan", "--tasks", "wikitext2", "--limit", "1"], "not valid JSON"),
        "incomplete plan": (["eval", f"{i}/incomplete-plan", "--tasks", "wikitext2"], "'kept_channels'"),
        "pruned directory without plan": (["eval", f"{i}/no-plan"], "no pruning_plan.json"),
        "eval with no task data": (
            ["eval", f"{i}/tiny", "--tasks", "wikitext2,piqa", "--data-dir", f"{i}/empty-data"],
            "none of the tasks",
        ),
        "eval output is a directory": (["eval", f"{i}/tiny", "--output", "mine"], "is a directory"),
        "recover lr nan": (
            ["recover", f"{i}/pruned", "--out", "r", "--lr", "nan", "--data", f"{i}/corpus.txt"],
            "lr must be a finite",
        ),
        "recover unknown objective": (
            ["recover", f"{i}/pruned", "--out", "r", "--objective", "dpo", "--data", f"{i}/corpus.txt"],
            "unknown objective",
        ),
        "recover unknown training": (
            ["recover", f"{i}/pruned", "--out", "r", "--train", "dense", "--data", f"{i}/corpus.txt"],
            "unknown --train",
        ),
        "recover mlp with an adapter": (
            [
                "recover",
                f"{i}/pruned",
                "--out",
                "r",
                "--train",
                "mlp",
                "--save-adapter",
                "a",
                "--data",
                f"{i}/corpus.txt",
            ],
            "no adapter",
        ),
        "recover into its input": (
            ["recover", f"{i}/pruned", "--out", f"{i}/pruned", "--overwrite", "--data", f"{i}/corpus.txt"],
            "the input",
        ),
        "bench empty list": (
            ["bench", f"{i}/tiny", f"{i}/pruned", "--batch-sizes", ""],
            "--batch-sizes is empty",
        ),
        "bench non-numeric list": (
            ["bench", f"{i}/tiny", f"{i}/pruned", "--prompt-lengths", "8,x"],
            "comma-separated list of ints",
        ),
        "bench across architectures": (
            ["bench", f"{i}/qwen", f"{i}/pruned", "--batch-sizes", "1", "--prompt-lengths", "8"],
            "differ in model_type",
        ),
        "export unknown outtype": (
            ["export", f"{i}/tiny", "--out", "m.gguf", "--outtype", "q3"],
            "--outtype",
        ),
        "export unknown format": (["export", f"{i}/tiny", "--out", "m.onnx", "--format", "onnx"], "--format"),
        "export out is a directory": (["export", f"{i}/tiny", "--out", "mine"], "is a directory"),
        "export over a foreign file": (
            ["export", f"{i}/tiny", "--out", "mine/notes.txt", "--overwrite"],
            "not written by cfsp",
        ),
        "export without BPE merges": (["export", f"{i}/tiny", "--out", "m.gguf"], "merges"),
        "bench a directory with llama.cpp": (
            ["bench", "--engine", "llamacpp", f"{i}/tiny", f"{i}/pruned"],
            "not a file",
        ),
        "unknown device": ([*prune, "--out", "o", "--device", "tpu"], "device"),
        "unknown dtype": (["eval", f"{i}/tiny", "--dtype", "float8"], "unknown dtype"),
    }
    if not torch.cuda.is_available():
        cases["gpu asked for on a machine without one"] = (
            [*prune, "--out", "o", "--device", "cuda"],
            "no CUDA GPU",
        )
    return cases


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, tmp_path):
    cases = _bad_inputs(inputs)
    workdirs = {}
    for index, name in enumerate(cases):
        cwd = tmp_path / f"case{index}"
        (cwd / "mine").mkdir(parents=True)
        (cwd / "mine" / "notes.txt").write_text("a folder of the user's")
        workdirs[name] = (cwd, snapshot(tmp_path / f"case{index}"))
    before_inputs = snapshot(inputs)

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(cases, pool.map(lambda n: run(cases[n][0], workdirs[n][0]), cases), strict=True))

    for name, (_args, phrase) in cases.items():
        result = done[name]
        lines = error_lines(result)
        assert result.returncode == 2, (name, result.returncode, result.stderr[-1500:])
        assert len(lines) == 1 and phrase in lines[0], (name, lines, result.stderr[-800:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-1500:])
        assert snapshot(workdirs[name][0]) == workdirs[name][1], name
    assert snapshot(inputs) == before_inputs


def test_overwrite_replaces_only_cfsp_output_and_respects_the_umask(inputs, tmp_path):
    args = ["prune", "--model", str(inputs / "tiny"), *FAST]
    args = [a.replace("corpus.txt", str(inputs / "corpus.txt")) for a in args]
    first = run([*args, "--out", "nested/out"], tmp_path, preexec_fn=lambda: os.umask(0o027))
    assert first.returncode == 0, first.stderr
    out = tmp_path / "nested" / "out"
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o640 for p in out.iterdir()}
    (out / "stale.txt").write_text("from before")
    again = run([*args, "--out", "nested/out", "--overwrite"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (out / "stale.txt").exists() and (out / "pruning_plan.json").is_file()
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["out"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_cleans_up_and_names_itself(inputs, tmp_path, sig, code):
    args = [
        "prune",
        "--model",
        str(inputs / "tiny"),
        "--out",
        "out",
        "--calib-source",
        str(inputs / "corpus.txt"),
    ]
    before = snapshot(tmp_path)
    process = start([*args, "--nsamples", "64", "--seqlen", "256", "--multiple", "32"], tmp_path)
    staging = tmp_path / ".out.cfsp-tmp"
    deadline = time.monotonic() + 120
    while not staging.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert staging.exists(), "the run never reserved its output"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-1500:]
    lines = [line for line in (stdout + stderr).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "nothing was written" in lines[0]
    assert "Traceback" not in stderr
    assert snapshot(tmp_path) == before


def test_a_killed_run_leaves_a_folder_that_the_next_run_removes(inputs, tmp_path):
    args = ["prune", "--model", str(inputs / "tiny"), "--calib-source", str(inputs / "corpus.txt")]
    process = start(
        [*args, "--out", "out", "--nsamples", "64", "--seqlen", "256", "--multiple", "32"], tmp_path
    )
    staging = tmp_path / ".out.cfsp-tmp"
    deadline = time.monotonic() + 120
    while not (staging / "owner.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    assert staging.is_dir()  # kill -9 leaves it: no process can clean up after that
    done = run([*args, "--out", "other", "--nsamples", "4", "--seqlen", "32", "--multiple", "32"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"removed {staging}" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_two_runs_into_one_output_cannot_both_succeed(inputs, tmp_path):
    args = ["prune", "--model", str(inputs / "tiny"), "--out", "out", *FAST]
    args = [a.replace("corpus.txt", str(inputs / "corpus.txt")) for a in args]
    runs = [start(args, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in runs]
    codes = sorted(p.returncode for p in runs)
    assert codes == [0, 2], [o[1][-800:] for o in outputs]
    failed = outputs[[p.returncode for p in runs].index(2)]
    lines = [line for line in (failed[0] + failed[1]).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and any(
        phrase in lines[0] for phrase in ("another cfsp run", "not empty", "written by another run")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((tmp_path / "out" / "pruning_plan.json").read_text())["method"] == "cfsp"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_location_fails_before_loading(inputs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    done = run(["prune", "--model", str(inputs / "tiny"), "--out", str(locked / "x")], tmp_path)
    assert done.returncode == 2 and "permission denied" in error_lines(done)[0]
    assert "loading" not in done.stdout
