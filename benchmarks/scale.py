"""Pruning a model larger than a block at a time: streaming vs in-memory, memory and time.

Builds (once) a float32 safetensors directory of a Llama-3.2-1B-shaped model with random weights
(cost does not depend on the values), then runs, each in its own process so that each peak RSS is
its own: one plain forward pass of the calibration windows through the dense model (the
yardstick), streamed pruning with the default options and with the one-pass mean compensation,
and in-memory pruning with the defaults. Writes results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, stamp, write_json

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)

CHILD = r"""
import json, sys, time, torch
import cfsp
mode, folder, out, n, length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from cfsp.models import load_tokenizer
calib = cfsp.calibration_windows(load_tokenizer(folder), n=n, length=length, seed=0)
start = time.perf_counter()
if mode == "forward":
    from cfsp.speed import forward_pass_seconds
    model, _ = cfsp.load_model(folder, device="cpu")
    start = time.perf_counter()
    seconds = forward_pass_seconds(model, calib, batch_size=8)
elif mode.startswith("stream"):
    from cfsp.streaming import prune_directory
    options = {"compensation": "mean"} if mode == "stream-mean" else {}
    result = prune_directory(folder, calib, 0.5, out, device="cpu", progress=False, **options)
    seconds = time.perf_counter() - start
else:
    model, tokenizer = cfsp.load_model(folder, device="cpu")
    result = cfsp.prune(model, calib, 0.5, progress=False)
    cfsp.save_pruned(model, tokenizer, result, out)
    seconds = time.perf_counter() - start
from cfsp.memory import peak_rss_bytes
print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))
"""


def build(folder: Path) -> None:
    """A random-weight model of the 1B shape, saved as float32 safetensors with a real tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import cfsp

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=torch.float32)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="2GB")
    _, tokenizer = cfsp.load_model("smollm2")  # any real tokenizer; ids stay below the vocab size
    tokenizer.save_pretrained(partial)
    partial.rename(folder)


def child(mode: str, folder: Path, out: Path, n: int, length: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(folder), str(out), str(n), str(length)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "scale")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    folder = args.work / "llama-1b-random-f32"
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build(folder)
    print(f"model ready in {time.perf_counter() - started:.0f} s", flush=True)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows = {}
    for mode in ("forward", "stream-mean", "stream", "memory"):
        rows[mode] = child(mode, folder, args.work / f"pruned-{mode}", args.nsamples, args.seqlen)
        print(rows[mode], flush=True)
    same = _same_output(args.work / "pruned-stream", args.work / "pruned-memory")
    payload = dict(
        when=stamp(),
        model=dict(config=LLAMA_1B, weights_bytes=weights, dtype="float32", values="random"),
        calibration=dict(n=args.nsamples, length=args.seqlen, source="wikitext2 validation"),
        sparsity=0.5,
        rows=rows,
        stream_over_forward=rows["stream"]["seconds"] / rows["forward"]["seconds"],
        stream_mean_over_forward=rows["stream-mean"]["seconds"] / rows["forward"]["seconds"],
        stream_peak_rss_over_weights=rows["stream"]["peak_rss_bytes"] / weights,
        stream_mean_peak_rss_over_weights=rows["stream-mean"]["peak_rss_bytes"] / weights,
        memory_peak_rss_over_weights=rows["memory"]["peak_rss_bytes"] / weights,
        streamed_equals_in_memory=same,
    )
    write_json(RESULTS / "scale.json", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "model"}, indent=1))


def _same_output(a: Path, b: Path) -> bool:
    """Same plan decisions and bit-identical tensors in the two pruned directories."""
    from safetensors import safe_open

    plans = [json.loads((d / "pruning_plan.json").read_text()) for d in (a, b)]
    if plans[0]["kept_channels"] != plans[1]["kept_channels"]:
        return False
    tensors = []
    for folder in (a, b):
        found = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(path, "pt") as handle:
                found.update({key: handle.get_tensor(key) for key in handle.keys()})
        tensors.append(found)
    if set(tensors[0]) != set(tensors[1]):
        return False
    return all(bool((tensors[0][k] == tensors[1][k]).all()) for k in tensors[0])


if __name__ == "__main__":
    main()
