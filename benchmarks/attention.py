"""Attention cuts against FFN-only pruning at the same total parameter reduction.

For one model and each budget (a share of *all* parameters, ``--total-sparsity``): FFN-only CFSP,
CFSP with N attention sublayers dropped (those that turn the residual stream least), and CFSP with
K KV groups removed from every attention sublayer, the FFN sparsity lowered to keep the same budget. Quality: WikiText-2 test perplexity (transformers)
per calibration seed, and the zero-shot mean for the first seed. Serving (``--gguf``, Llama-style
families only): each variant exported to f16 GGUF (llama.cpp's deci), timed in llama.cpp on this
CPU at two context lengths (prefill of the whole prompt, then decode after it; every file once
per round, medians; with flash attention, without which llama.cpp pads every layer's V cache to
the widest layer's), and the KV-cache bytes at each context. Writes results/attention_<model>.*.

    python benchmarks/attention.py --model smollm2 --gguf
    python benchmarks/attention.py --model smollm2 --drops 0 --kv-groups 1 --tag kv --gguf
    python benchmarks/attention.py --model gemma3-270m
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, prepare, pruned_variant, speeds, stamp, wikitext_ppl, write_json

import cfsp
from cfsp.evaluation import ZERO_SHOT_TASKS, evaluate, zero_shot_mean
from cfsp.export import export_gguf
from cfsp.models import count_parameters
from cfsp.outdir import write_text_atomic


def kv_bytes(config, attention_blocks: int, context: int, element_bytes: int = 2) -> int:
    """K and V of every block with attention, for ``context`` tokens, in f16 (``config``: the
    pruned model's, whose KV heads a KV-group cut lowers)."""
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * attention_blocks * heads * head_dim * context * element_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.30])
    parser.add_argument(
        "--drops", nargs="+", default=["2", "4"], help="attention sublayers dropped: counts, or auto"
    )
    parser.add_argument(
        "--kv-groups", type=int, nargs="+", default=[], help="KV groups removed per attention sublayer"
    )
    parser.add_argument("--kv-metrics", nargs="+", default=["refit"], help="KV-group metrics to compare")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=32)
    parser.add_argument("--limit", type=int, default=100, help="examples per zero-shot task (first seed)")
    parser.add_argument("--gguf", action="store_true", help="also export f16 GGUF and time llama.cpp")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    drops = [0] + [d if d == "auto" else int(d) for d in args.drops if d != "0"]
    cuts = [(n, 0, None) for n in drops] + [(0, k, m) for k in args.kv_groups if k for m in args.kv_metrics]
    variants = [
        (f"{budget:.0%} {_cut_label(n, k, m)}", budget, n, k, m)
        for budget in args.budgets
        for n, k, m in cuts
    ]
    rows: dict[str, dict] = {}
    scratch = tempfile.TemporaryDirectory(prefix="cfsp-attention-")
    folder = Path(scratch.name)
    files: dict[str, Path] = {}
    dense_config = None
    for seed in args.seeds:
        setup = prepare(args.model, args.nsamples, args.seqlen, seed=seed, time_forward=False)
        dense_config = setup.model.config
        blocks = dense_config.num_hidden_layers
        if "dense" not in rows:
            rows["dense"] = dict(label="dense", budget=0.0, dropped=0, kv_groups=0, ppl=[], params=None)
            if args.gguf:
                setup.model.save_pretrained(folder / "dense")
                setup.tokenizer.save_pretrained(folder / "dense")
                files["dense"] = export_gguf(folder / "dense", folder / "dense.gguf", "f16", progress=False)
        if seed == args.seeds[0]:
            rows["dense"]["ppl"].append(wikitext_ppl(setup.model, setup.tokenizer, args.ppl_windows, 512))
            rows["dense"]["params"] = count_parameters(setup.model)
            rows["dense"]["attention_blocks"] = blocks
            rows["dense"]["kv_heads"] = dense_config.num_key_value_heads
            rows["dense"]["zero_shot_mean"] = zero_shot_mean(
                evaluate(setup.model, setup.tokenizer, ZERO_SHOT_TASKS, limit=args.limit, seqlen=512)[
                    "results"
                ]
            )
        for label, budget, drop, kv_groups, metric in variants:
            started = time.perf_counter()
            if kv_groups:  # the heads' statistics come from a calibration pass of its own
                model = copy.deepcopy(setup.model)
                options = dict(total_sparsity=budget, kv_groups=kv_groups, kv_group_metric=metric)
                result = cfsp.prune(model, setup.calib, progress=False, **options)
            else:
                model, result = pruned_variant(setup, None, total_sparsity=budget, drop_attention=drop)
            ppl = wikitext_ppl(model, setup.tokenizer, args.ppl_windows, 512)
            row = rows.setdefault(
                label, dict(label=label, budget=budget, dropped=drop, kv_groups=kv_groups, ppl=[], seeds=[])
            )
            row["ppl"].append(ppl)
            row["seeds"].append(
                dict(
                    seed=seed,
                    dropped_attention=result.dropped_attention,
                    ffn_sparsity=result.realised_sparsity,
                )
            )
            row["params"] = result.params_after
            row["attention_blocks"] = blocks - len(result.dropped_attention)
            row["kv_heads"] = model.config.num_key_value_heads
            if result.kept_kv_groups is not None:
                kept = [None if g is None else g.tolist() for g in result.kept_kv_groups]
                row["seeds"][-1]["kept_kv_groups"] = kept
            if result.attention_search:
                row["seeds"][-1]["search"] = result.attention_search
            message = f"seed {seed} {label}: ppl {ppl:.2f}, dropped {result.dropped_attention}, FFN sparsity"
            message += (
                f" {result.realised_sparsity:.3f}, total {1 - result.params_after / result.params_before:.3f}"
            )
            if seed == args.seeds[0]:
                row["attention_importance"] = result.attention_importance
                row["mlp_importance"] = result.mlp_importance
                scores = evaluate(model, setup.tokenizer, ZERO_SHOT_TASKS, limit=args.limit, seqlen=512)
                row["zero_shot_mean"] = zero_shot_mean(scores["results"])
                message += f", zero-shot {row['zero_shot_mean']:.3f}"
                if args.gguf:
                    directory = folder / label.replace(" ", "_").replace("%", "")
                    cfsp.save_pruned(model, setup.tokenizer, result, directory)
                    files[label] = export_gguf(
                        directory, directory.with_suffix(".gguf"), "f16", progress=False
                    )
            print(message + f" ({time.perf_counter() - started:.0f} s)", flush=True)
            del model
        del setup

    for row in rows.values():
        row["ppl_mean"] = statistics.mean(row["ppl"])
        row["total_sparsity"] = 1 - row["params"] / rows["dense"]["params"]
        config = copy.copy(dense_config)
        config.num_key_value_heads = row["kv_heads"]
        for context in args.contexts:
            row[f"kv_mb_{context}"] = kv_bytes(config, row["attention_blocks"], context) / 1e6
    if args.gguf:
        for context in args.contexts:
            print(f"timing llama.cpp at {context} tokens of context ...", flush=True)
            timing = speeds(files, context, args.decode_tokens, args.rounds, flash_attn=True)
            for label, speed in timing.items():
                rows[label][f"prefill_{context}"] = speed["prefill_tokens_per_s"]
                rows[label][f"decode_{context}"] = speed["decode_tokens_per_s"]
    scratch.cleanup()

    name = args.model.replace("/", "_") + (f"_{args.tag}" if args.tag else "")
    payload = dict(
        model=args.model,
        when=stamp(),
        protocol=dict(
            calibration=f"{args.nsamples} x {args.seqlen} WikiText-2 validation tokens, seeds {args.seeds}",
            perplexity=f"WikiText-2 test, {args.ppl_windows} x 512 tokens (transformers)",
            zero_shot=f"7 tasks x {args.limit} examples, first seed only",
            speed=f"llama.cpp f16 with flash attention on this CPU, prompts of {args.contexts} tokens then "
            f"{args.decode_tokens} decoded, median of {args.rounds} rounds",
            kv_cache="f16 K and V of the blocks that keep attention, at their KV head count",
        ),
        rows=list(rows.values()),
    )
    write_json(RESULTS / f"attention_{name}.json", payload)
    write_text_atomic(RESULTS / f"attention_{name}.md", markdown(payload, args))
    print(markdown(payload, args))


def _cut_label(dropped, kv_groups: int, metric: str | None) -> str:
    if kv_groups:
        return f"KV groups -{kv_groups} ({metric})"
    return "FFN only" if dropped == 0 else f"attn -{dropped}"


def markdown(payload: dict, args) -> str:
    rows = payload["rows"]
    dense = rows[0]
    head = "| variant | params (total sparsity) | FFN sparsity | dropped blocks | ppl per seed | ppl mean | zero-shot |"
    lines = [f"# Attention cuts vs FFN-only at equal total parameters: {payload['model']}", "",
             f"{payload['when']}. " + "; ".join(f"{k}: {v}" for k, v in payload["protocol"].items()) + ".", "",
             head, "|---" * (head.count("|") - 1) + "|"]  # fmt: skip
    for row in rows:
        seeds = row.get("seeds") or []
        ffn = ", ".join(f"{s['ffn_sparsity']:.3f}" for s in seeds) or "-"
        dropped = "; ".join(",".join(map(str, s["dropped_attention"])) or "-" for s in seeds) or "-"
        ppl = " / ".join(f"{p:.2f}" for p in row["ppl"])
        zero = f"{row['zero_shot_mean']:.3f}" if row.get("zero_shot_mean") is not None else "-"
        lines.append(
            f"| {row['label']} | {row['params'] / 1e6:.1f} M ({row['total_sparsity']:.3f}) | {ffn} | {dropped} | "
            f"{ppl} | {row['ppl_mean']:.2f} | {zero} |"
        )
    for row in rows:
        for run in row.get("seeds") or []:
            if run.get("search"):
                tried = ", ".join(f"{t['drop_attention']}: {t['heldout_loss']:.4f}" for t in run["search"])
                lines.append(f"\n{row['label']}, seed {run['seed']}: held-out loss per count tried: {tried}.")
    contexts = args.contexts
    lines += ["", "| variant | " + " | ".join(f"KV MB @ {c}" for c in contexts)]
    if f"prefill_{contexts[0]}" in dense:
        lines[-1] += " | " + " | ".join(f"prefill tok/s @ {c} | decode tok/s @ {c}" for c in contexts)
    lines[-1] += " |"
    lines.append("|---" * (lines[-1].count("|") - 1) + "|")
    for row in rows:
        cells = [f"{row[f'kv_mb_{c}']:.1f}" for c in contexts]
        if f"prefill_{contexts[0]}" in row:
            for c in contexts:
                cells += [
                    f"{row[f'prefill_{c}']:.0f} ({row[f'prefill_{c}'] / dense[f'prefill_{c}']:.2f}x)",
                    f"{row[f'decode_{c}']:.1f} ({row[f'decode_{c}'] / dense[f'decode_{c}']:.2f}x)",
                ]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
