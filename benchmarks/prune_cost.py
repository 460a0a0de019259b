"""What pruning costs: wall time as a multiple of one plain forward pass over the same tokens, and
peak memory against the weights, each case in its own process so that each peak is its own.

- SmolLM2-135M, 32 x 512 calibration tokens, cfsp defaults (refit), in memory: the Gram matrices
  held from the one calibration pass (``second_moments="auto"`` chooses to hold them here)
  against a second pass that collects them one block at a time (``"second-pass"``).
- Qwen2.5-1.5B-Instruct at its full published size (``tests/real_configs``, random float32
  weights saved as a safetensors directory: memory does not depend on the values), 8 x 256
  calibration tokens, cfsp defaults (too few tokens for the refit, so the mean fallback),
  ``cfsp prune --no-stream`` (loaded whole) and streamed, through the command line; the pruning
  time is the plan's (loading and writing excluded), the forward pass is timed after the
  ``--no-stream`` run in the same process.

The forward pass is timed in the same process after pruning, on a fresh copy of the dense
model, in batches of 8 windows (the pass's batch size). Writes ``results/prune_cost.json``.

    python benchmarks/prune_cost.py            # every case
    python benchmarks/prune_cost.py --only smollm2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, stamp, write_json

ROOT = Path(__file__).resolve().parents[1]

API_CHILD = r"""
import json, sys, torch
import cfsp
from cfsp.speed import forward_pass_seconds
from cfsp.memory import peak_rss_bytes, pruning_cost
mode, n, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tokenizer = cfsp.load_model("smollm2", device="cpu")
calib = cfsp.calibration_windows(tokenizer, n=n, length=length, seed=0)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
result, cost = pruning_cost(cfsp.prune, model, calib, 0.5, second_moments=mode, progress=False)
peak = peak_rss_bytes()
del model
forward = forward_pass_seconds(cfsp.load_model("smollm2", device="cpu")[0], calib, batch_size=8)
print(json.dumps(dict(peak_rss_bytes=peak, weights_bytes=weights, seconds=cost["seconds"],
                      forward_seconds=forward, second_moments=result.second_moments)))
"""

SAVE_CHILD = r"""
import sys, torch
sys.path.insert(0, "tests")
from transformers import AutoConfig, AutoModelForCausalLM
from real_models import raw_config
from cfsp.models import load_tokenizer, resolve_gguf
torch.manual_seed(0)
config = AutoConfig.for_model(**raw_config(sys.argv[1]))
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(sys.argv[2])
gguf = resolve_gguf("smollm2")  # any real tokenizer: its ids lie below Qwen's vocabulary too
load_tokenizer(gguf.parent, gguf.name).save_pretrained(sys.argv[2])
"""

CLI_CHILD = r"""
import json, sys, time
from typer.testing import CliRunner
from cfsp.cli import app
from cfsp.memory import peak_rss_bytes
from safetensors import safe_open
from pathlib import Path
source, out, stream = sys.argv[1], sys.argv[2], sys.argv[3] == "stream"
weights = 0
for f in Path(source).glob("*.safetensors"):
    with safe_open(f, "pt") as handle:
        for key in handle.keys():
            s = handle.get_slice(key)
            n = 1
            for d in s.get_shape():
                n *= d
            weights += 4 * n
args = ["prune", "--model", source, "--out", out, "--nsamples", "8", "--seqlen", "256", "--device", "cpu",
        "--stream" if stream else "--no-stream"]
started = time.perf_counter()
done = CliRunner().invoke(app, args, catch_exceptions=False)
assert done.exit_code == 0, done.output
row = dict(peak_rss_bytes=peak_rss_bytes(), weights_bytes=weights, command_seconds=time.perf_counter() - started,
           seconds=json.loads((Path(out) / "pruning_plan.json").read_text())["seconds"])
if not stream:  # one plain forward pass over the same windows, on the dense model
    import cfsp
    from cfsp.models import load_tokenizer
    from cfsp.speed import forward_pass_seconds
    from cfsp.streaming import load_whole
    calib = cfsp.calibration_windows(load_tokenizer(source), n=8, length=256, seed=0)
    row["forward_seconds"] = forward_pass_seconds(load_whole(source, device="cpu"), calib, batch_size=8)
print(json.dumps(row))
"""


def child(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"case {args} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def smollm2_rows() -> dict:
    rows = {}
    for mode in ("auto", "second-pass"):
        row = child(API_CHILD, mode, "32", "512")
        row.update(model="smollm2", calibration="32 x 512", mode=mode)
        row["peak_over_weights"] = row["peak_rss_bytes"] / row["weights_bytes"]
        row["cost_in_forward_passes"] = row["seconds"] / row["forward_seconds"]
        rows[f"smollm2, second_moments={mode}"] = row
        print(rows[f"smollm2, second_moments={mode}"], flush=True)
    return rows


def qwen_rows() -> dict:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cfsp-cost-") as tmp:
        source = Path(tmp) / "qwen2.5-1.5b"
        child(SAVE_CHILD, "qwen2.5-1.5b-instruct", str(source))
        for stream in ("no-stream", "stream"):
            row = child(CLI_CHILD, str(source), str(Path(tmp) / f"out-{stream}"), stream)
            row.update(model="qwen2.5-1.5b-instruct", calibration="8 x 256", mode=f"--{stream}")
            row["peak_over_weights"] = row["peak_rss_bytes"] / row["weights_bytes"]
            forward = row.get("forward_seconds") or rows.get("qwen2.5-1.5b, --no-stream", {}).get(
                "forward_seconds"
            )
            if forward:
                row["forward_seconds"] = forward
                row["cost_in_forward_passes"] = row["seconds"] / forward
            rows[f"qwen2.5-1.5b, --{stream}"] = row
            print(rows[f"qwen2.5-1.5b, --{stream}"], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("smollm2", "qwen"), default=None)
    args = parser.parse_args()
    path = RESULTS / "prune_cost.json"
    previous = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    rows = dict(previous.get("rows", {}))
    if args.only in (None, "smollm2"):
        rows.update(smollm2_rows())
    if args.only in (None, "qwen"):
        rows.update(qwen_rows())
    write_json(path, {"when": stamp(), "sparsity": 0.5, "rows": rows})


if __name__ == "__main__":
    main()
