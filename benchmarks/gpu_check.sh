#!/usr/bin/env bash
# One short run on a machine with a CUDA GPU (under 8 minutes): prune SmolLM2 on cuda in bfloat16
# and float32, compare the kept channels with the CPU float32 result block by block, time pruning
# against one forward pass of the same tokens, and print the peak GPU memory; then the recovery and
# vLLM steps below. Needs `make install`; not yet run (no GPU was available where it was written).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYTHON'
import copy, json, time
import torch
import cfsp
from cfsp.speed import forward_pass_seconds
from cfsp.statistics import calibrate

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

# Recovery at GPU scale: SmolLM2 pruned 50 % (defaults, and --compensation reconstruct), then MLP
# fine-tuning + KD and IG-LoRA + KD on the instruction mix for a fixed number of steps of 16 x 256
# tokens: the fraction of the WikiText-2 log-perplexity gap closed against the tokens seen.
"$PY" - <<'PYTHON'
import copy, json, math, tempfile, time
import torch
import cfsp
from cfsp.evaluation import perplexity
from cfsp.recovery import DEFAULT_LR, RecoveryConfig, load_recovery_data, recover

dense, tokenizer = cfsp.load_model("smollm2", device="cuda", dtype="float32")
calib = cfsp.calibration_windows(tokenizer, n=32, length=512, seed=0)
data = load_recovery_data("instructions", tokenizer, 256)
ppl = lambda m: perplexity(m, tokenizer, seqlen=512, limit=32, batch_size=8)["ppl"]
dense_ppl = ppl(dense)
rows = []
for compensation in ("refit", "reconstruct"):
    pruned = copy.deepcopy(dense)
    start = time.perf_counter()
    result = cfsp.prune(pruned, calib, 0.5, compensation=compensation, progress=False)
    prune_s = time.perf_counter() - start
    before = ppl(pruned)
    for train, steps in (("mlp", 100), ("mlp", 400), ("lora", 400)):
        config = RecoveryConfig(train=train, objective="kd", steps=steps, lr=DEFAULT_LR[train], batch_size=16,
                                grad_accum=1, seqlen=256, warmup_steps=steps // 10, seed=0, logging_steps=50,
                                save_steps=steps)
        with tempfile.TemporaryDirectory() as checkpoints:
            done = recover(copy.deepcopy(pruned), tokenizer, data, result.block_importance, config,
                           output_dir=checkpoints, teacher=dense)
        after = ppl(done.model)
        gap = (math.log(before) - math.log(after)) / (math.log(before) - math.log(dense_ppl))
        rows.append(dict(compensation=compensation, prune_s=round(prune_s, 1), train=train, steps=steps,
                         tokens=done.tokens_seen, train_s=round(done.train_seconds, 1), ppl_dense=dense_ppl,
                         ppl_before=before, ppl_after=after, gap_closed=round(gap, 4)))
        print(json.dumps(rows[-1]), flush=True)
# reconstruction on a bfloat16 model (its training runs on float32 copies of each MLP)
half = copy.deepcopy(dense).to(torch.bfloat16)
start = time.perf_counter()
cfsp.prune(half, calib, 0.5, compensation="reconstruct", progress=False)
print(json.dumps({"reconstruct_bfloat16_prune_s": round(time.perf_counter() - start, 1),
                  "reconstruct_bfloat16_ppl": ppl(half.float()),
                  "reconstruct_float32_ppl": rows[-1]["ppl_before"]}))
PYTHON

# The recovery token curve of benchmarks/recovery_curve.py at GPU scale: SmolLM2 at 50 %, distilled
# from the dense model, bf16, 64 windows of 1024 tokens per step, scored on WikiText-2 test at 1M, 4M,
# 10M and 20M tokens. Set RECOVERY_CORPUS to a folder of general-text shards; without it the corpus is
# the shipped WikiText-2 validation split (about 0.25M tokens, so 20M tokens repeat it some 80 times:
# a check of speed and mechanics, not of quality). Results: benchmarks/results/recovery_curve_smollm2_gpu.*
timeout 480 "$PY" benchmarks/recovery_curve.py --tokens 1048576,4194304,10485760,20971520 --seeds 0 \
  --trained "all block weights,LoRA" --reconstruct "" --batch-size 64 --seqlen 1024 --bf16 \
  --corpus "${RECOVERY_CORPUS:-wikitext2}" --suffix _gpu || echo "recovery curve: stopped at its 8-minute limit"

# vLLM: serve the dense SmolLM2 and its 50 % pruned `--format vllm` export (DeciLM layout, per-block
# widths) on the GPU, compare greedy continuations with transformers on the same GPU, and time
# decoding dense vs pruned. vLLM is installed here, in its own environment, from the registry.
OUT=${OUT:-$(mktemp -d)}
"$PY" -m cfsp.cli convert smollm2 --out "$OUT/dense" >/dev/null
"$PY" -m cfsp.cli prune --model "$OUT/dense" --nsamples 32 --seqlen 512 --device cuda --out "$OUT/pruned" >/dev/null
"$PY" -m cfsp.cli export "$OUT/pruned" --format vllm --out "$OUT/vllm"
# the same with two attention sublayers dropped (attention.no_op blocks, no KV cache there)
"$PY" -m cfsp.cli prune --model "$OUT/dense" --nsamples 32 --seqlen 512 --device cuda --drop-attention 2 --out "$OUT/dropped" >/dev/null
"$PY" -m cfsp.cli export "$OUT/dropped" --format vllm --out "$OUT/vllm-dropped"
# and with one of SmolLM2's three KV groups removed from every attention sublayer (6 heads, 2 KV heads)
"$PY" -m cfsp.cli prune --model "$OUT/dense" --nsamples 32 --seqlen 512 --device cuda --kv-groups 1 --out "$OUT/kv" >/dev/null
"$PY" -m cfsp.cli export "$OUT/kv" --format vllm --out "$OUT/vllm-kv"
python3 -m venv "$OUT/vllm-env" && "$OUT/vllm-env/bin/pip" install --quiet vllm
"$OUT/vllm-env/bin/python" - "$OUT" <<'PYTHON'
import json, sys, time
from vllm import LLM, SamplingParams
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch

out = sys.argv[1]
prompts = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process", "Once upon a time"]
greedy = SamplingParams(temperature=0.0, max_tokens=32)
report = {}
runs = (("dense", f"{out}/dense", False), ("pruned", f"{out}/vllm", True), ("dropped", f"{out}/vllm-dropped", True),
        ("kv", f"{out}/vllm-kv", True))
for name, folder, remote in runs:
    llm = LLM(folder, trust_remote_code=remote, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    texts = [o.outputs[0].text for o in llm.generate(prompts, greedy)]
    start = time.perf_counter()
    done = llm.generate(["Hello"] * 64, SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True))
    seconds = time.perf_counter() - start
    report[name] = {"decode_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in done) / seconds, "texts": texts}
    del llm
    torch.cuda.empty_cache()
# transformers on the same GPU, the pruned directories through cfsp's modeling file
tok = AutoTokenizer.from_pretrained(f"{out}/pruned")
for name in ("pruned", "dropped", "kv"):
    hf = AutoModelForCausalLM.from_pretrained(f"{out}/{name}", trust_remote_code=True, dtype=torch.float32).cuda()
    agree = []
    for prompt, text in zip(prompts, report[name]["texts"]):
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        ours = tok.decode(hf.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True)
        agree.append(ours == text)
    report[f"{name}_greedy_agrees_with_transformers"] = agree
    report[f"{name}_decode_speedup"] = report[name]["decode_tokens_per_s"] / report["dense"]["decode_tokens_per_s"]
print(json.dumps(report, indent=1))
PYTHON

# Mixture-of-experts at real scale (needs Qwen3-30B-A3B in $QWEN3_MOE, a safetensors directory, and
# about 70 GB of GPU memory in bfloat16): REAP at 25 % and 50 % of the routed experts, calibrated on
# code (the standard library) and on prose (WikiText-2), then WikiText-2 perplexity and a few
# zero-shot tasks of each, and vLLM serving the 50 % stock directory. Skipped without the model.
if [ -n "${QWEN3_MOE:-}" ] && [ -d "$QWEN3_MOE" ]; then
  python3 - "$QWEN3_MOE" > "$OUT/stdlib.txt" <<'PYTHON'
import pathlib, sys, sysconfig
root = pathlib.Path(sysconfig.get_paths()["stdlib"])
for path in sorted(root.glob("*.py"))[:400]:
    print(path.read_text(encoding="utf-8", errors="ignore"))
PYTHON
  for fraction in 0.25 0.5; do
    for calib in wikitext2 "$OUT/stdlib.txt"; do
      name="q30-$fraction-$(basename "$calib" .txt)"
      "$PY" -m cfsp.cli prune --model "$QWEN3_MOE" --expert-sparsity "$fraction" --calib-source "$calib" \
        --nsamples 128 --seqlen 2048 --device cuda --out "$OUT/$name" >/dev/null
      "$PY" -m cfsp.cli eval "$OUT/$name" --tasks wikitext2,arc_easy,piqa --limit 200 --device cuda \
        --output "$OUT/$name.json" >/dev/null
      echo "$name $(cat "$OUT/$name.json")"
    done
  done
  "$PY" -m cfsp.cli eval "$QWEN3_MOE" --tasks wikitext2,arc_easy,piqa --limit 200 --device cuda --output "$OUT/q30-dense.json" >/dev/null
  echo "dense $(cat "$OUT/q30-dense.json")"
  "$OUT/vllm-env/bin/python" -c "
import sys; from vllm import LLM, SamplingParams
llm = LLM(sys.argv[1], dtype='bfloat16', gpu_memory_utilization=0.8, enforce_eager=True)
print(llm.generate(['def fibonacci(n):'], SamplingParams(temperature=0, max_tokens=48))[0].outputs[0].text)
" "$OUT/q30-0.5-wikitext2"
fi
