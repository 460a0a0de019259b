"""The pruned model where it is served: llama.cpp speed and perplexity of exported GGUF files.

Prunes SmolLM2 at 50 % with cfsp's defaults, exports the dense and the pruned model as f16 and
q8_0 GGUF files, then measures in llama.cpp (one run, the two models interleaved ABBA, batch 1):
prefill of a 512-token prompt and greedy decode, with the parameter ceiling next to the speed-up;
and WikiText-2 test perplexity of the f16 files through llama.cpp against the transformers models
on the same token windows. Writes results/llamacpp_<model>.json and .md. ``--uniform`` prunes to one
width in every block and exports both models from directories, through llama.cpp's own converter
for families without ``deci`` (Gemma-3: ``python benchmarks/llamacpp.py --model gemma3-270m
--uniform``), writing results/llamacpp_<model>_uniform.*.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, add_protocol_arguments, prepare, pruned_variant, stamp, write_json

import cfsp
from cfsp.evaluation import perplexity_of_ids, wikitext_ids
from cfsp.export import export_gguf
from cfsp.llamacpp import perplexity as llama_cpp_perplexity
from cfsp.speed import llamacpp_speed_benchmark


def test_windows(tokenizer, windows: int, seqlen: int):
    """The first ``windows`` WikiText-2 test windows, as ``cfsp.evaluation.perplexity`` cuts them."""
    ids = wikitext_ids(tokenizer)
    return ids[: windows * seqlen].reshape(windows, seqlen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--uniform", action="store_true", help="one width in every block (a stock checkpoint)"
    )
    add_protocol_arguments(parser)
    args = parser.parse_args()

    setup = prepare(args.model, args.nsamples, args.seqlen, time_forward=False)
    pruned, result = pruned_variant(setup, args.sparsity, uniform=args.uniform)
    windows = test_windows(setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
    rows, quality = [], []
    with tempfile.TemporaryDirectory(prefix="cfsp-llamacpp-") as scratch:
        folder = Path(scratch)
        cfsp.save_pruned(pruned, setup.tokenizer, result, folder / "pruned")
        dense_source = args.model
        if args.uniform:  # the converter reads directories
            setup.model.save_pretrained(folder / "dense")
            setup.tokenizer.save_pretrained(folder / "dense")
            dense_source = folder / "dense"
        files = {}
        for outtype in ("f16", "q8_0"):
            files[("dense", outtype)] = export_gguf(dense_source, folder / f"dense-{outtype}.gguf", outtype)
            files[("pruned", outtype)] = export_gguf(
                folder / "pruned", folder / f"pruned-{outtype}.gguf", outtype
            )
        for name, model in (("dense", setup.model), ("pruned", pruned)):
            hf = perplexity_of_ids(model, windows.reshape(-1), args.ppl_seqlen)["ppl"]
            ours = llama_cpp_perplexity(files[(name, "f16")], windows)
            quality.append(
                dict(model=name, transformers_ppl=hf, llama_cpp_f16_ppl=ours, rel_diff=ours / hf - 1)
            )
            print(quality[-1], flush=True)
        for outtype in ("f16", "q8_0"):
            speed = llamacpp_speed_benchmark(
                files[("dense", outtype)],
                files[("pruned", outtype)],
                prompt_lengths=(args.prompt_length,),
                decode_tokens=args.decode_tokens,
                repeats=args.repeats,
            )
            sizes = {name: files[(name, outtype)].stat().st_size for name in ("dense", "pruned")}
            rows.append(dict(outtype=outtype, file_bytes=sizes, **speed))
            print(
                outtype, speed["rows"][0]["prefill_speedup"], speed["rows"][0]["decode_speedup"], flush=True
            )
    payload = dict(
        model=args.model,
        when=stamp(),
        sparsity=args.sparsity,
        widths=result.widths,
        calibration=dict(n=args.nsamples, length=args.seqlen, seed=0),
        ppl=dict(split="wikitext2 test", windows=args.ppl_windows, seqlen=args.ppl_seqlen, rows=quality),
        speed=rows,
    )
    stem = f"llamacpp_{args.model}" + ("_uniform" if args.uniform else "")
    write_json(RESULTS / f"{stem}.json", payload)
    how = "cfsp defaults, --uniform" if args.uniform else "cfsp defaults"
    lines = [
        f"# {args.model} in llama.cpp: dense vs {args.sparsity:.0%} FFN-pruned ({how})",
        "",
        f"CPU, {rows[0]['threads']} threads, batch 1, median of {args.repeats} interleaved runs; "
        f"prefill of {args.prompt_length} tokens, {args.decode_tokens} greedy decode steps.",
        "",
        "| weights | file MB dense | pruned | prefill tok/s dense | pruned | x | decode tok/s dense | pruned | x "
        "| decode ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["rows"][0]
        d, p = r["dense"], r["pruned"]
        lines.append(
            f"| {row['outtype']} | {row['file_bytes']['dense'] / 1e6:.0f} | {row['file_bytes']['pruned'] / 1e6:.0f} "
            f"| {d['prefill_tokens_per_s']:,.0f} | {p['prefill_tokens_per_s']:,.0f} | {r['prefill_speedup']:.2f} "
            f"| {d['decode_tokens_per_s']:,.1f} | {p['decode_tokens_per_s']:,.1f} | {r['decode_speedup']:.2f} "
            f"| {row['decode_ceiling']:.2f} |"
        )
    lines += [
        "",
        f"WikiText-2 test perplexity, {args.ppl_windows} windows of {args.ppl_seqlen}, same token ids:",
        "",
        "| model | transformers (float32) | llama.cpp (f16 GGUF) | difference |",
        "|---|---|---|---|",
    ]
    for q in quality:
        lines.append(
            f"| {q['model']} | {q['transformers_ppl']:.2f} | {q['llama_cpp_f16_ppl']:.2f} | {100 * q['rel_diff']:+.2f} % |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
