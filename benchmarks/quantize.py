"""Pruning on top of quantization: file size, quality and llama.cpp speed of every combination.

For one model: dense and pruned at each sparsity (cfsp defaults; ``--uniform`` for families that
llama.cpp runs only with one width in every block, such as Gemma-3), each exported once as f16 and
quantized by llama.cpp's own quantizer to each type. Pruned widths are multiples of 128 (cfsp's
default) and, with ``--multiple-256``, also of 256 (K-quant types only), which K-quants need to
keep ``ffn_down`` in the requested type. For every file: its size, WikiText-2 test perplexity through llama.cpp on the
same windows, which matrices llama.cpp stored in a fallback type, and llama.cpp prefill and decode
speed on this CPU (one sequence; every file timed once per round, rounds repeated, medians).
Writes results/quantize_<model>.json and .md and a plot of perplexity against file size and
against decode speed with the Pareto front (results/quantize_<model>.png).

    python benchmarks/quantize.py --model smollm2 --multiple-256
    python benchmarks/quantize.py --model gemma3-270m --uniform
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import (
    RESULTS,
    add_protocol_arguments,
    prepare,
    pruned_variant,
    speeds,
    stamp,
    test_windows,
    write_json,
)

import cfsp
from cfsp.export import export_gguf, quantize_gguf
from cfsp.llamacpp import perplexity as llama_cpp_perplexity

TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def pareto(rows: list[dict], cost: str, lower_cost_better: bool) -> set[str]:
    """Labels of the rows no other row beats on both ``cost`` and perplexity."""
    front = set()
    for row in rows:
        better = [
            other
            for other in rows
            if other is not row
            and other["ppl"] <= row["ppl"]
            and (other[cost] <= row[cost] if lower_cost_better else other[cost] >= row[cost])
            and (other["ppl"] < row["ppl"] or other[cost] != row[cost])
        ]
        if not better:
            front.add(row["label"])
    return front


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("file_mb", "file size (MB)", True), ("decode", "decode tokens/s (llama.cpp, CPU)", False))
    for axis, (cost, label, lower) in zip(axes, panels, strict=True):
        front = pareto(rows, cost, lower)
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model]
            axis.scatter([r[cost] for r in mine], [r["ppl"] for r in mine], label=model, s=28)
        on_front = sorted((r for r in rows if r["label"] in front), key=lambda r: r[cost])
        axis.plot(
            [r[cost] for r in on_front], [r["ppl"] for r in on_front], "k--", lw=1, label="Pareto front"
        )
        for r in on_front:
            axis.annotate(
                r["outtype"], (r[cost], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        axis.set_xlabel(label)
        axis.set_ylabel("WikiText-2 perplexity (llama.cpp)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.2, 0.35, 0.5])
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument(
        "--dense-types",
        nargs="*",
        default=["q3_k_m", "q2_k"],
        help="types for the dense model only: dense files as small as the pruned ones, to compare with",
    )
    parser.add_argument("--tag", help="results file stem suffix")
    parser.add_argument("--uniform", action="store_true", help="one width in every block")
    parser.add_argument("--multiple-256", action="store_true", help="also prune to multiples of 256")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    add_protocol_arguments(parser)
    parser.set_defaults(ppl_windows=32)
    args = parser.parse_args()

    setup = prepare(args.model, args.nsamples, args.seqlen, time_forward=False)
    windows = test_windows(setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
    variants = [("dense", None, 128)] + [(f"{s:.0%}", s, 128) for s in args.sparsities]
    if args.multiple_256:
        variants += [(f"{s:.0%} m256", s, 256) for s in args.sparsities]
    rows, files = [], {}
    with tempfile.TemporaryDirectory(prefix="cfsp-quantize-") as scratch:
        folder = Path(scratch)
        for name, sparsity, multiple in variants:
            directory = folder / name.replace(" ", "-").replace("%", "")
            widths = None
            if sparsity is None:
                setup.model.save_pretrained(directory)
                setup.tokenizer.save_pretrained(directory)
            else:
                pruned, result = pruned_variant(setup, sparsity, uniform=args.uniform, multiple=multiple)
                cfsp.save_pruned(pruned, setup.tokenizer, result, directory)
                widths = result.widths
                del pruned
            f16 = export_gguf(directory, directory.with_suffix(".f16.gguf"), "f16", progress=False)
            for outtype in args.types + (args.dense_types if sparsity is None else []):
                if multiple == 256 and "_k" not in outtype:
                    continue  # the multiple of 256 matters only to K-quants
                label = f"{name} {outtype}"
                if outtype == "f16":
                    path, fallbacks, summary = f16, [], "-"
                else:
                    path = directory.with_suffix(f".{outtype}.gguf")
                    report = quantize_gguf(f16, path, outtype)
                    fallbacks = [vars(item) for item in report.fallbacks]
                    summary = report.summary()
                ppl = llama_cpp_perplexity(path, windows)
                rows.append(
                    dict(
                        label=label,
                        model=name,
                        sparsity=sparsity or 0.0,
                        multiple=multiple if sparsity else None,
                        outtype=outtype,
                        file_mb=path.stat().st_size / 1e6,
                        ppl=ppl,
                        widths=widths,
                        fallbacks=fallbacks,
                        fallback_summary=summary,
                    )
                )
                files[label] = path
                print(label, f"{rows[-1]['file_mb']:.0f} MB ppl {ppl:.2f}; {summary}", flush=True)
        timing = speeds(files, args.prompt_length, args.decode_tokens, args.rounds)
    for row in rows:
        row.update(timing[row["label"]])
        row["decode"] = row["decode_tokens_per_s"]
    front_size, front_speed = pareto(rows, "file_mb", True), pareto(rows, "decode", False)
    for row in rows:
        row["pareto_size"], row["pareto_speed"] = row["label"] in front_size, row["label"] in front_speed
    stem = f"quantize_{args.model}" + (f"_{args.tag}" if args.tag else "")
    write_json(
        RESULTS / f"{stem}.json",
        dict(
            model=args.model,
            when=stamp(),
            uniform=args.uniform,
            calibration=dict(n=args.nsamples, length=args.seqlen, seed=0),
            ppl=dict(
                split="wikitext2 test", windows=args.ppl_windows, seqlen=args.ppl_seqlen, engine="llama.cpp"
            ),
            speed=dict(
                prompt_length=args.prompt_length, decode_tokens=args.decode_tokens, rounds=args.rounds
            ),
            rows=rows,
        ),
    )
    how = "cfsp defaults" + (", --uniform" if args.uniform else "")
    lines = [
        f"# {args.model}: pruning ({how}) x llama.cpp quantization",
        "",
        f"WikiText-2 test perplexity through llama.cpp, {args.ppl_windows} windows of {args.ppl_seqlen}; "
        f"speed: llama.cpp on this CPU, {rows[0]['threads']} threads, one sequence, prefill of "
        f"{args.prompt_length} tokens, {args.decode_tokens} greedy decode steps, median of {args.rounds} rounds. "
        "Pareto: no other file is both smaller (or faster) and better.",
        "",
        "| model | type | file MB | ppl | prefill tok/s | decode tok/s | Pareto size / speed | matrices in a fallback type |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        marks = f"{'yes' if r['pareto_size'] else '-'} / {'yes' if r['pareto_speed'] else '-'}"
        lines.append(
            f"| {r['model']} | {r['outtype']} | {r['file_mb']:.0f} | {r['ppl']:.2f} | {r['prefill_tokens_per_s']:,.0f} "
            f"| {r['decode_tokens_per_s']:,.1f} | {marks} | {len(r['fallbacks'])} |"
        )
    lines += [
        "",
        "Which matrices llama.cpp stored in a fallback type (rows not a multiple of the type's block):",
        "",
    ]
    lines += [f"- {r['label']}: {r['fallback_summary']}" for r in rows if r["fallbacks"]]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, f"{args.model}: pruning x llama.cpp quantization", RESULTS / f"{stem}.png")


if __name__ == "__main__":
    main()
