#!/usr/bin/env bash
# One short run on a machine with a CUDA GPU (under 5 minutes): prune SmolLM2 on cuda in bfloat16
# and float32, compare the kept channels with the CPU float32 result block by block, time pruning
# against one forward pass of the same tokens, and print the peak GPU memory. Needs `make install`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYTHON'
import copy, json, time
import torch
import cfsp
from cfsp.bench import forward_pass_seconds
from cfsp.calibration import calibrate

assert torch.cuda.is_available(), "no CUDA GPU visible"
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
cpu_model, tokenizer = cfsp.load_model("smollm2", device="cpu", dtype="float32")
calib = cfsp.calibration_windows(tokenizer, n=32, length=512, seed=0)
reference = cfsp.prune(copy.deepcopy(cpu_model), calib, 0.5, progress=False)
report = {}
for dtype in ("bfloat16", "float32"):
    model = copy.deepcopy(cpu_model).to("cuda", getattr(torch, dtype))
    forward = min(forward_pass_seconds(model, calib, batch_size=8) for _ in range(2))
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = cfsp.prune(model, calib, 0.5, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) / max(len(b), 1)
        for a, b in zip(result.kept_channels, reference.kept_channels, strict=True)
    ]
    report[dtype] = {
        "prune_s": round(seconds, 3),
        "forward_s": round(forward, 3),
        "prune_over_forward": round(seconds / forward, 2),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        "same_widths_as_cpu": result.widths == reference.widths,
        "kept_overlap_min": round(min(overlap), 4),
        "kept_overlap_per_block": [round(o, 4) for o in overlap],
        "realised_sparsity": round(result.realised_sparsity, 4),
    }
    print(dtype, json.dumps(report[dtype]))
    del model
print(json.dumps(report))
PYTHON
