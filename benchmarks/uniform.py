"""What ``--uniform`` costs: the same width in every block (a stock checkpoint every engine serves)
against cfsp's importance-based widths, both with the refit.

Per model and calibration seed: one calibration pass (32 x 512 WikiText-2 validation tokens, with
second moments), then cfsp defaults and cfsp ``uniform=True`` at 20 % and 50 %, each scored by
WikiText-2 test perplexity on 32 windows of 512 tokens. A uniform width is one multiple of 128, so
it can miss the request (SmolLM2's 1,536 channels at 20 %: 1,280 kept, 16.7 %); the importance
widths are then also run at the uniform's realised sparsity, so the two compare at equal size.
Writes ``results/uniform.{json,md}``.

    python benchmarks/uniform.py --model smollm2 --model gemma3-270m --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics

from common import RESULTS, prepare, pruned_variant, stamp, wikitext_ppl, write_json

from cfsp.outdir import write_text_atomic

VARIANTS = {"cfsp (importance widths)": {}, "cfsp --uniform": {"uniform": True}}
# and, where the uniform width misses the request: "at the uniform's size" (importance widths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for name in args.model or ["smollm2", "gemma3-270m"]:
        for seed in args.seeds:
            setup = prepare(name, args.nsamples, args.seqlen, seed=seed, time_forward=False)
            dense = wikitext_ppl(setup.model, setup.tokenizer, args.ppl_windows, 512)
            for requested in args.sparsities:
                runs = list(VARIANTS.items())
                for label, options in runs:
                    sparsity = requested
                    if label == "at the uniform's size":
                        sparsity = options.pop("match")
                    model, result = pruned_variant(setup, sparsity, **options)
                    ppl = wikitext_ppl(model, setup.tokenizer, args.ppl_windows, 512)
                    row = dict(model=name, seed=seed, sparsity=sparsity, variant=label, ppl=ppl, dense_ppl=dense,
                               realised=result.realised_sparsity, widths=result.widths,
                               params_after=result.params_after, params_before=result.params_before)  # fmt: skip
                    row["requested"] = requested
                    rows.append(row)
                    if options.get("uniform") and abs(result.realised_sparsity - requested) > 0.005:
                        runs.append(("at the uniform's size", {"match": result.realised_sparsity}))
                    print(f"{name} seed {seed} {sparsity:.2f} {label}: ppl {ppl:.2f} (dense {dense:.2f}), "
                          f"realised {result.realised_sparsity:.3f}", flush=True)  # fmt: skip
                del model
    write_json(RESULTS / "uniform.json", {"date": stamp(), "args": vars(args), "rows": rows})
    lines = [
        "| model | requested | variant | WikiText-2 ppl, mean of seeds (each seed) | realised sparsity | widths |",
        "|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["model"], r["requested"], r["variant"]) for r in rows))
    for model, sparsity, variant in keys:
        mine = [r for r in rows if (r["model"], r["requested"], r["variant"]) == (model, sparsity, variant)]
        ppls = [r["ppl"] for r in mine]
        widths = mine[0]["widths"]
        shown = f"{widths[0]} everywhere" if len(set(widths)) == 1 else f"{min(widths)}-{max(widths)}"
        lines.append(
            f"| {model} (dense {mine[0]['dense_ppl']:.2f}) | {sparsity:.0%} | {variant} | "
            f"{statistics.mean(ppls):.2f} ({', '.join(f'{p:.2f}' for p in ppls)}) | "
            f"{mine[0]['realised']:.3f} | {shown} |"
        )
    write_text_atomic(RESULTS / "uniform.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
