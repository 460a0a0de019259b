"""Expert pruning measured on a small mixture-of-experts model trained here.

No real MoE checkpoint exists on this machine, so this trains one: a Qwen3-MoE-class model (6
blocks, 32 routed experts, top-4, load-balancing loss) with its own 8k BPE tokenizer, on two kinds
of text so that routing is learnt and experts can specialise:

- prose: the shipped instruction sets (dolly, gpteacher) for training, WikiText-2 validation for
  calibration, WikiText-2 test for evaluation;
- code: the Python standard library's own source files, split by module name into training (80 %),
  calibration (10 %) and held-out evaluation (10 %) modules.

No evaluation split is trained on. The model is cached under ``$CFSP_CACHE`` (default
``~/.cache/cfsp``), not in the repository. Then, at 25 % and 50 % of the experts removed, two
calibration seeds, every expert score (reap, frequency, gate_mass, random) and both calibration
domains, the held-out perplexity on both evaluation sets; the routing entropy and per-expert load
of the dense model; GGUF sizes and llama.cpp decode/prefill, dense against 50 % (``llamacpp_figures``).
Writes ``results/moe.{json,md}``.

    python benchmarks/moe.py [--minutes 12]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import cfsp
from cfsp.data import data_file, read_jsonl
from cfsp.evaluation.perplexity import window_nll
from cfsp.experts import moe_blocks
from cfsp.models import decoder_blocks
from cfsp.outdir import dumps, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("CFSP_CACHE", Path.home() / ".cache" / "cfsp")) / "moe-bench-v1"
VOCAB, SEQLEN, EXPERTS, TOP_K = 8192, 256, 32, 4
EVAL_WINDOWS, CALIB_WINDOWS = 48, 32
FRACTIONS, METRICS, SEEDS = (0.25, 0.5), ("reap", "frequency", "gate_mass", "random"), (0, 1)
CHANNELS = "channels inside experts"  # the same share of expert parameters, as channels of every expert
IMPORTANCE = "reap, importance counts"  # REAP's experts, with per-block counts from the coarse step


# --------------------------------------------------------------------------- the corpora


def _split_of(name: str) -> str:
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "calibration" if bucket == 0 else "evaluation" if bucket == 1 else "train"


def code_texts() -> dict[str, list[str]]:
    """The standard library's ``.py`` files (tests excluded), split by module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[str]] = {"train": [], "calibration": [], "evaluation": []}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if any(
            part in ("test", "tests", "idlelib", "site-packages") for part in path.relative_to(root).parts
        ):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        splits[_split_of(relative)].append(text)
    return splits


def prose_texts() -> dict[str, list[str]]:
    train = []
    for row in read_jsonl(data_file("dolly_hhrlhf_small/train.jsonl")):
        train.append(row["prompt"] + row["response"])
    for row in read_jsonl(data_file("gpteacher_roleplay/train.jsonl")):
        train.append("\n".join(filter(None, (row["instruction"], row["input"], row["output"]))))
    wiki = {
        split: [r["text"] for r in read_jsonl(data_file(f"wikitext2/{split}.jsonl"))]
        for split in ("validation", "test")
    }
    return {"train": train, "calibration": wiki["validation"], "evaluation": wiki["test"]}


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [eos]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, count: int, seed: int | None = None) -> torch.Tensor:
    """``count`` windows: disjoint and in order (seed None), or at random starts (a seed)."""
    if seed is None:
        usable = stream[: (stream.numel() // SEQLEN) * SEQLEN].view(-1, SEQLEN)
        return usable[:count]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - SEQLEN, (count,), generator=generator)
    return torch.stack([stream[s : s + SEQLEN] for s in starts.tolist()])


# --------------------------------------------------------------------------- the model


def moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=384, moe_intermediate_size=96, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, norm_topk_prob=True, router_aux_loss_coef=0.01, output_router_logits=True,
        tie_word_embeddings=True, max_position_embeddings=SEQLEN, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip


def train(tokenizer, streams: dict[str, torch.Tensor], minutes: float, log: list) -> torch.nn.Module:
    """Train on the two training streams, alternating batches, for ``minutes``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    started, step, batch = time.perf_counter(), 0, 16
    budget = minutes * 60
    model.train()
    while (elapsed := time.perf_counter() - started) < budget:
        lr = (
            3e-3
            * min(1.0, (step + 1) / 50)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        kind = ("prose", "code")[step % 2]
        x = windows(streams[kind], batch, seed=10_000 + step)
        out = model(x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            entry = {
                "step": step,
                "seconds": round(elapsed, 1),
                "kind": kind,
                "loss": round(out.loss.item(), 4),
            }
            log.append(entry)
            print(entry, flush=True)
        step += 1
    log.append(
        {"steps": step, "tokens": step * batch * SEQLEN, "seconds": round(time.perf_counter() - started, 1)}
    )
    model.config.output_router_logits = False
    return model.eval()


def cached_model(minutes: float):
    """The trained model and tokenizer (trained once, then read from the cache), and the data."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    prose, code = prose_texts(), code_texts()
    if (CACHE / "model" / "config.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(CACHE / "model")
        model = AutoModelForCausalLM.from_pretrained(CACHE / "model", dtype=torch.float32).eval()
        log = json.loads((CACHE / "train_log.json").read_text())
    else:
        CACHE.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer(prose["train"] + code["train"])
        streams = {
            "prose": token_stream(tokenizer, prose["train"]),
            "code": token_stream(tokenizer, code["train"]),
        }
        log = [{"train_tokens": {k: int(v.numel()) for k, v in streams.items()}}]
        model = train(tokenizer, streams, minutes, log)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, CACHE / "model")
            os.makedirs(tmp)  # TemporaryDirectory removes it again
        write_text_atomic(CACHE / "train_log.json", dumps(log))
    data = {
        name: {split: token_stream(tokenizer, texts[split]) for split in ("calibration", "evaluation")}
        for name, texts in (("prose", prose), ("code", code))
    }
    return model, tokenizer, data, log


# --------------------------------------------------------------------------- the measurements


def perplexities(model, evaluation: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for name, ids in evaluation.items():
            total, count = window_nll(model, ids, batch_size=8)
            out[name] = math.exp(total / count)
    return out


def routing_load(model, ids: torch.Tensor) -> dict:
    """Per MoE block: the share of routed slots each expert gets on ``ids`` and its entropy
    (normalised: 1 = perfectly even)."""
    loads: dict[int, torch.Tensor] = {}
    handles = []
    for index, moe in enumerate(moe_blocks(decoder_blocks(model))):

        def hook(_module, args, kwargs, _out, index=index, count=moe.count):
            chosen = [*args, *kwargs.values()][1].reshape(-1)
            loads[index] = (
                loads.get(index, torch.zeros(count)) + torch.bincount(chosen, minlength=count).float()
            )

        handles.append(moe.experts.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for start in range(0, ids.shape[0], 8):
            model(ids[start : start + 8])
    for handle in handles:
        handle.remove()
    rows = {}
    for index, load in loads.items():
        share = load / load.sum()
        entropy = float(-(share.clamp_min(1e-12).log() * share).sum() / math.log(len(share)))
        rows[index] = {"entropy": round(entropy, 4), "max_share": round(float(share.max()), 4),
                       "min_share": round(float(share.min()), 4)}  # fmt: skip
    return rows


def llamacpp_figures(root: Path) -> dict:
    """GGUF size and llama.cpp decode/prefill, dense against half of the experts removed. llama.cpp's
    converter knows SmolLM2's tokenizer, not the benchmark's own, so this pair has the same
    architecture with SmolLM2's 49k vocabulary and untrained weights: speed and size do not depend
    on what the weights learnt."""
    from transformers import AutoModelForCausalLM

    from cfsp.export import export_gguf
    from cfsp.models import load_tokenizer, resolve_gguf
    from cfsp.speed import llamacpp_speed_benchmark

    gguf = resolve_gguf("smollm2")
    tokenizer = load_tokenizer(gguf.parent, gguf.name)
    config = moe_config()
    config.vocab_size, config.max_position_embeddings = len(tokenizer), 1024
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    pruned = copy.deepcopy(dense)
    calib = torch.randint(100, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    plan = cfsp.prune(pruned, calib, expert_sparsity=0.5, progress=False)
    out = {"vocab": len(tokenizer), "params_dense": plan.params_before, "params_pruned": plan.params_after}
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        export_gguf(root / name, root / f"{name}.gguf", "f16", progress=False)
        out[f"{name}_gguf_bytes"] = (root / f"{name}.gguf").stat().st_size
    speed = llamacpp_speed_benchmark(
        root / "dense.gguf", root / "pruned.gguf", prompt_lengths=(128, 512), threads=2
    )
    out["speed"] = speed["rows"]
    return out


def importance_counts(plan, fraction: float) -> list[int]:
    """Per-MoE-block expert counts from the CFSP coarse step (block importance -> keep fractions),
    rounded to whole experts within [top-k, E], with the same total as the uniform count."""
    from cfsp.allocation import cfsp_keep_fractions
    from cfsp.moe import kept_count

    blocks = [i for i, n in enumerate(plan.original_experts) if n is not None]
    count = plan.original_experts[blocks[0]]
    importance = [plan.block_importance[i] for i in blocks]
    keep = cfsp_keep_fractions(importance, fraction)
    counts = [min(count, max(TOP_K, round(f * count))) for f in keep]
    target = kept_count(count, fraction) * len(blocks)
    order = sorted(range(len(blocks)), key=lambda j: importance[j])  # least important first
    while sum(counts) > target:
        j = next(j for j in order if counts[j] > TOP_K)
        counts[j] -= 1
    while sum(counts) < target:
        j = next(j for j in reversed(order) if counts[j] < count)
        counts[j] += 1
    return counts


def prune_with_counts(model, plan, counts: list[int]):
    """A copy of ``model`` keeping, in MoE block j, its ``counts[j]`` best experts by the plan's scores
    (in memory only: per-block counts have no stock checkpoint)."""
    from cfsp.experts import choose_experts, keep_experts

    pruned = copy.deepcopy(model)
    moes = [(i, m) for i, m in enumerate(moe_blocks(decoder_blocks(pruned))) if m is not None]
    for (index, moe), keep in zip(moes, counts, strict=True):
        keep_experts(moe, choose_experts(torch.tensor(plan.expert_scores[index]), keep))
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--minutes", type=float, default=12.0, help="training time if the model is not cached"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer, data, log = cached_model(args.minutes)
    evaluation = {name: windows(data[name]["evaluation"], EVAL_WINDOWS) for name in data}
    dense_ppl = perplexities(model, evaluation)
    print("dense", dense_ppl, flush=True)
    result = {
        "model": {"params": sum(p.numel() for p in model.parameters()), "experts": EXPERTS, "top_k": TOP_K,
                  "blocks": len(decoder_blocks(model)), "vocab": VOCAB, "seqlen": SEQLEN},
        "training": log, "eval_windows": EVAL_WINDOWS, "calib_windows": CALIB_WINDOWS,
        "dense": dense_ppl,
        "routing": {name: routing_load(model, evaluation[name]) for name in evaluation},
        "runs": [],
    }  # fmt: skip
    for fraction in FRACTIONS:
        for domain in ("prose", "code"):
            for seed in SEEDS:
                calib = windows(data[domain]["calibration"], CALIB_WINDOWS, seed=seed)
                for metric in (*METRICS, CHANNELS):  # and IMPORTANCE, beside reap
                    pruned = copy.deepcopy(model)
                    cut = {"expert_channel_sparsity": fraction} if metric == CHANNELS else {
                        "expert_sparsity": fraction, "expert_metric": metric}  # fmt: skip
                    plan = cfsp.prune(pruned, calib, progress=False, **cut)
                    run = {"fraction": fraction, "calibration": domain, "seed": seed, "metric": metric,
                           "params": plan.params_after, "ppl": perplexities(pruned, evaluation),
                           "kept": [k.tolist() for k in plan.kept_experts if k is not None]}  # fmt: skip
                    result["runs"].append(run)
                    print(
                        {k: run[k] for k in ("fraction", "calibration", "seed", "metric", "ppl")}, flush=True
                    )
                    if metric == "reap":  # the same scores, with per-block counts from block importance
                        counts = importance_counts(plan, fraction)
                        variant = prune_with_counts(model, plan, counts)
                        result["runs"].append({"fraction": fraction, "calibration": domain, "seed": seed,
                                               "metric": IMPORTANCE, "counts": counts,
                                               "ppl": perplexities(variant, evaluation)})  # fmt: skip
                        print(IMPORTANCE, counts, result["runs"][-1]["ppl"], flush=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result["llamacpp"] = llamacpp_figures(Path(tmp))
    except Exception as exc:  # noqa: BLE001 - llama.cpp is an optional extra
        result["llamacpp"] = {"error": f"{type(exc).__name__}: {exc}"}
    write_text_atomic(RESULTS / "moe.json", dumps(result, indent=1))
    write_text_atomic(RESULTS / "moe.md", table(result))
    print(table(result))


def table(result: dict) -> str:
    lines = [
        f"Dense: prose {result['dense']['prose']:.2f}, code {result['dense']['code']:.2f} (perplexity, "
        f"{result['eval_windows']} x {SEQLEN} held-out tokens each). Mean of seeds {SEEDS}, "
        f"{result['calib_windows']} x {SEQLEN} calibration tokens.",
        "",
        "| expert parameters removed | calibration | what goes | prose ppl | code ppl |",
        "|---|---|---|---|---|",
    ]
    for fraction in FRACTIONS:
        for domain in ("prose", "code"):
            for metric in (*METRICS, IMPORTANCE, CHANNELS):
                runs = [
                    r
                    for r in result["runs"]
                    if (r["fraction"], r["calibration"], r["metric"]) == (fraction, domain, metric)
                ]
                cells = []
                for name in ("prose", "code"):
                    values = [r["ppl"][name] for r in runs]
                    cells.append(f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})")
                lines.append(f"| {fraction:.0%} | {domain} | {metric} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
