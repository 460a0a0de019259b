"""Recovery on two CPU processes (gloo) under torchrun equals recovery in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_worker(tmp_path, name: str, processes: int, data, resume: bool = False, checkpoints=None, **config):
    result = tmp_path / f"{name}.pt"
    checkpoints = checkpoints or tmp_path / f"{name}.checkpoints"
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    args = [str(WORKER), "--config", json.dumps(config), "--data", str(data)]
    args += ["--checkpoints", str(checkpoints), "--result", str(result)] + (["--resume"] if resume else [])
    done = subprocess.run([*launcher, *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(result)


BASE = dict(seqlen=32, lr=1e-2, dropout=0.0, logging_steps=1, save_steps=100, lr_scheduler="constant")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rows = [
        json.dumps({"text": f"document {i}: the cat sat on the mat and the dog ran. " * 3}) for i in range(40)
    ]
    (folder / "a.jsonl").write_text("\n".join(rows[:25]) + "\n")
    (folder / "b.txt").write_text("a plain text shard about birds and trees. " * 40)
    (folder / "c.jsonl").write_text("\n".join(rows[25:]) + "\n")
    return folder


def assert_same_run(one, two, atol):
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["tokens"] == one["tokens"]
    assert two["losses"] == pytest.approx(one["losses"], abs=atol)
    assert one["state"].keys() == two["state"].keys()
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, atol=atol, rtol=0, msg=key)


def test_ddp_trains_as_one_process_with_the_same_global_batch(tmp_path, corpus):
    """Two processes x batch 2, or one process x batch 2 x 2 accumulated: the same global batch of
    4 windows per step, so the same loss curve and the same merged weights."""
    settings = dict(BASE, steps=4, batch_size=2, batch_tokens=128, eval_steps=2, eval_windows=3)
    one = run_worker(tmp_path, "one", 1, corpus, **settings)
    two = run_worker(tmp_path, "ddp", 2, corpus, **settings)
    assert not two["sharded"]
    assert_same_run(one, two, atol=1e-5)
    assert two["eval"] == pytest.approx(one["eval"], abs=1e-5) and len(one["eval"]) == 3


@pytest.mark.parametrize("train", ["mlp", "lora"])
def test_fsdp_with_a_sharded_teacher_trains_as_one_process(tmp_path, corpus, train):
    """FSDP shards the student's blocks and the frozen teacher's: distillation equals the whole-model
    run, and the weights gathered on rank 0 (LoRA: merged there) equal the one-process ones."""
    settings = dict(BASE, steps=3, batch_size=2, batch_tokens=128, objective="kd", train=train, lr=1e-3)
    one = run_worker(tmp_path, "one", 1, corpus, **settings)
    two = run_worker(tmp_path, "fsdp", 2, corpus, fsdp=True, **settings)
    assert two["sharded"]
    assert_same_run(one, two, atol=1e-4)


def test_a_checkpoint_of_two_sharded_processes_resumes_in_one(tmp_path, corpus):
    settings = dict(BASE, batch_size=2, batch_tokens=128, save_steps=2, objective="lm+kd")
    whole = run_worker(tmp_path, "whole", 1, corpus, steps=5, **settings)
    run_worker(tmp_path, "first", 2, corpus, fsdp=True, steps=2, checkpoints=tmp_path / "split", **settings)
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["checkpoint-2"]
    resumed = run_worker(
        tmp_path, "rest", 1, corpus, resume=True, steps=5, checkpoints=tmp_path / "split", **settings
    )
    assert_same_run(whole, {**resumed, "processes": 2}, atol=1e-4)


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, corpus):
    from conftest import make_byte_tokenizer, make_tiny_model
    from typer.testing import CliRunner

    from cfsp.cli import app

    root = tmp_path_factory.mktemp("cli")
    make_tiny_model("llama").save_pretrained(root / "tiny")
    make_byte_tokenizer().save_pretrained(root / "tiny")
    text = root / "calib.txt"
    text.write_text("\n".join(f"sentence number {i} for calibration" for i in range(300)))
    args = ["prune", "--model", str(root / "tiny"), "--calib-source", str(text), "--nsamples", "4"]
    done = CliRunner().invoke(
        app, [*args, "--seqlen", "32", "--multiple", "32", "--out", str(root / "pruned")]
    )
    assert done.exit_code == 0, done.output
    return root / "pruned"


def run_cli(tmp_path, args, env_extra=None, logs=None):
    command = [*TORCHRUN]
    if logs is not None:
        command += ["--log-dir", str(logs), "--redirects", "3"]
    command += [str(HERE / "distributed_cli.py"), *args]
    env = {**_env(), **(env_extra or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def rank_log(logs, rank: int, stream: str) -> str:
    (path,) = logs.rglob(f"{rank}/{stream}.log")
    return path.read_text()


def test_the_command_runs_on_two_processes_and_rank_0_alone_writes(tmp_path, pruned, corpus):
    out = tmp_path / "recovered"
    args = ["recover", str(pruned), "--out", str(out), "--data", str(corpus), "--seqlen", "16"]
    args += ["--steps", "2", "--batch-size", "2", "--batch-tokens", "64", "--objective", "kd", "--fsdp"]
    done = run_cli(tmp_path, args, logs=tmp_path / "logs")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    import cfsp

    recovery = cfsp.read_plan(out)["recovery"]
    assert (recovery["processes"], recovery["sharded"], recovery["steps"]) == (2, True, 2)
    assert recovery["tokens_seen"] == 2 * 64
    assert "saved to" in rank_log(tmp_path / "logs", 0, "stdout")
    assert rank_log(tmp_path / "logs", 1, "stdout").strip() == ""
    assert "recovery" not in rank_log(tmp_path / "logs", 1, "stderr")  # no progress bar, no log lines
    model, _ = cfsp.load_pruned(out)
    assert model.config.num_hidden_layers == 4
    # Every process saw the same output reservation: a second run into OUT fails on all with one line.
    again = run_cli(tmp_path, args, logs=tmp_path / "logs2")
    assert again.returncode != 0
    assert "is not empty" in rank_log(tmp_path / "logs2", 0, "stderr")
    assert "error" not in rank_log(tmp_path / "logs2", 1, "stderr")


def test_accelerate_launch_runs_the_same_command(tmp_path, pruned, corpus):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "recovered"
    args = [
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "-m",
        "cfsp",
        "recover",
        str(pruned),
        "--out",
        str(out),
    ]
    args += [
        "--data",
        str(corpus),
        "--seqlen",
        "16",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--batch-tokens",
        "64",
    ]
    done = subprocess.run(
        [str(accelerate), *args], env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    import cfsp

    assert cfsp.read_plan(out)["recovery"]["processes"] == 2


def test_a_rank_that_dies_leaves_no_output(tmp_path, pruned, corpus):
    out = tmp_path / "recovered"
    checkpoints = tmp_path / "recovered.checkpoints"
    args = [
        "recover",
        str(pruned),
        "--out",
        str(out),
        "--data",
        str(corpus),
        "--seqlen",
        "16",
        "--steps",
        "40",
    ]
    args += ["--batch-size", "2", "--batch-tokens", "64", "--save-steps", "1"]
    done = run_cli(tmp_path, args, env_extra={"KILL_RANK1_WHEN": str(checkpoints / "checkpoint-2")})
    assert done.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "recovered.checkpoints"
    ]  # no OUT, no staging folder
    saved = {p.name for p in checkpoints.iterdir()}
    assert "checkpoint-2" in saved and not any(name.startswith(".") for name in saved)  # no half checkpoint


def test_python_dash_m_cfsp_is_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "cfsp", "recover", "--help"], env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0 and "--fsdp" in done.stdout and "--batch-tokens" in done.stdout
