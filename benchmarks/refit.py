"""Compensation after pruning: none vs mean bias vs least-squares refit of down_proj.

Each seed draws its own calibration windows; every candidate prunes a copy of the same dense
model from that seed's statistics and is scored on the same WikiText-2 test windows. Also times
the calibration pass with and without the Gram matrices the refit needs.
Writes results/refit_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics

from common import RESULTS, add_protocol_arguments, prepare, pruned_variant, stamp, wikitext_ppl, write_json

from cfsp.bench import pruning_cost
from cfsp.calibration import calibrate


def candidates(dampings: list[float]) -> dict[str, dict]:
    rows = {"cfsp mean (default)": dict(compensation="mean")}
    rows.update({f"cfsp refit d={d:g}": dict(compensation="refit", refit_damping=d) for d in dampings})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    add_protocol_arguments(parser)
    parser.add_argument("--seed", type=int, action="append")
    parser.add_argument("--sparsity", type=float, action="append")
    parser.add_argument("--damping", type=float, action="append")
    args = parser.parse_args()
    seeds, sparsities = args.seed or [0, 1], args.sparsity or [0.2, 0.5]
    table = candidates(args.damping or [1e-3, 1e-2, 1e-1])
    rows, cost = [], {}
    for seed in seeds:
        setup = prepare(
            args.model, args.nsamples, args.seqlen, seed=seed, time_forward=False, second_moments=True
        )
        if seed == seeds[0]:
            _, plain = pruning_cost(calibrate, setup.model, setup.calib, 8, None, False)
            cost = dict(calibration_s=plain["seconds"], calibration_with_gram_s=setup.calib_seconds)
            dense = wikitext_ppl(setup.model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
            rows.append(dict(candidate="dense", sparsity=0.0, seed=None, ppl=dense))
            print(f"dense ppl {dense:.2f}; calibration {cost}", flush=True)
        for sparsity in sparsities:
            for name, options in table.items():
                model, result = pruned_variant(setup, sparsity, **options)
                ppl = wikitext_ppl(model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
                rows.append(
                    dict(
                        candidate=name,
                        sparsity=sparsity,
                        seed=seed,
                        ppl=ppl,
                        options=options,
                        realised_sparsity=result.realised_sparsity,
                    )
                )
                print(f"seed {seed} p={sparsity} {name:22s} ppl {ppl:9.2f}", flush=True)
                del model
    payload = dict(
        model=args.model,
        when=stamp(),
        calibration=dict(n=args.nsamples, length=args.seqlen, source="wikitext2 validation", seeds=seeds),
        ppl=dict(split="wikitext2 test", windows=args.ppl_windows, seqlen=args.ppl_seqlen),
        cost=cost,
        rows=rows,
    )
    write_json(RESULTS / f"refit_{args.model}.json", payload)
    lines = [
        f"# Compensation on {args.model}",
        "",
        "| candidate | sparsity | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for sparsity in sparsities:
        for name in table:
            ppls = [r["ppl"] for r in rows if r["candidate"] == name and r["sparsity"] == sparsity]
            lines.append(
                f"| {name} | {sparsity:.2f} | "
                + " | ".join(f"{p:.2f}" for p in ppls)
                + f" | {statistics.mean(ppls):.2f} |"
            )
    (RESULTS / f"refit_{args.model}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
