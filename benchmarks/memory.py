"""Peak memory of in-memory pruning (the Python API, GGUF inputs, ``--no-stream``), each case in
its own process so that each peak is its own.

- SmolLM2-135M (32 x 512 calibration tokens, cfsp defaults = refit): with every block's Gram
  matrix collected in the first pass and held until allocation (what ``prune`` did before; a
  benchmark reusing one calibration pass still does it), against the second pass that holds one
  block's Gram matrix at a time (``prune`` now); and with ``compensation="reconstruct"``.
- Qwen2.5-1.5B-Instruct at its full published size (``tests/real_configs``, random float32
  weights: memory does not depend on the values), 8 x 256 calibration tokens, cfsp defaults: too
  few tokens for the refit, so the mean fallback is chosen before anything is collected.

Each case reports the peak RSS of the process (weights included), the weights' bytes, and the
pruning time as a multiple of one dense forward pass of the same tokens (timed after pruning, in
the same process, on a fresh copy of the model). Writes ``results/memory.json``.

    python benchmarks/memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS, stamp, write_json

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "smollm2, all Grams held (one pass)": ("smollm2", 32, 512, "held"),
    "smollm2, one Gram at a time": ("smollm2", 32, 512, "refit"),
    "smollm2, reconstruct": ("smollm2", 32, 512, "reconstruct"),
    "qwen2.5-1.5b, defaults": ("qwen2.5-1.5b-instruct", 8, 256, "refit"),
}

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, "tests")
import cfsp
from cfsp.bench import forward_pass_seconds
from cfsp.statistics import calibrate
from cfsp.memory import peak_rss_bytes, pruning_cost
name, n, length, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from cfsp.models import load_tokenizer, resolve_gguf
gguf = resolve_gguf("smollm2")  # any real tokenizer: its ids lie below Qwen's vocabulary too
tokenizer = load_tokenizer(gguf.parent, gguf.name)
calib = cfsp.calibration_windows(tokenizer, n=n, length=length, seed=0)

def make():
    if name == "smollm2":
        return cfsp.load_model("smollm2", device="cpu")[0]
    from transformers import AutoConfig, AutoModelForCausalLM
    from real_models import raw_config
    torch.manual_seed(0)
    config = AutoConfig.for_model(**raw_config(name))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

model = make()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
options = {"compensation": "reconstruct"} if mode == "reconstruct" else {}
def run():
    if mode == "held":
        stats = calibrate(model, calib, second_moments=True, progress=False)
        return cfsp.prune(model, calib, 0.5, stats=stats, progress=False)
    return cfsp.prune(model, calib, 0.5, progress=False, **options)
result, cost = pruning_cost(run)
peak = peak_rss_bytes()
del model
forward = forward_pass_seconds(make(), calib, batch_size=8)
print(json.dumps(dict(peak_rss_bytes=peak, weights_bytes=weights, seconds=cost["seconds"],
                      forward_seconds=forward, compensation=result.options["compensation"])))
"""


def main() -> None:
    rows = {}
    for label, (name, n, length, mode) in CASES.items():
        done = subprocess.run(
            [sys.executable, "-c", CHILD, name, str(n), str(length), mode],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(model=name, calibration=f"{n} x {length}")
        row["peak_over_weights"] = row["peak_rss_bytes"] / row["weights_bytes"]
        row["cost_in_forward_passes"] = row["seconds"] / row["forward_seconds"]
        rows[label] = row
        print(label, json.dumps(row), flush=True)
    write_json(RESULTS / "memory.json", {"when": stamp(), "sparsity": 0.5, "rows": rows})


if __name__ == "__main__":
    main()
