"""Compensation after pruning: none vs mean bias vs least-squares refit of down_proj, per method.

Each calibration seed draws its own windows; every candidate prunes a copy of the same dense model
from that seed's statistics and is scored on the same WikiText-2 test windows, so differences come
from the candidate alone. The first seed also times a plain forward pass of the calibration
windows and the calibration pass with and without the Gram matrices the refit needs.
Writes results/refit_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import RESULTS, add_protocol_arguments, prepare, pruned_variant, stamp, wikitext_ppl, write_json

from cfsp.memory import pruning_cost
from cfsp.speed import forward_pass_seconds
from cfsp.statistics import calibrate

DEFAULT = "cfsp mean (previous default)"  # the baseline every row is compared with


def candidates(dampings: list[float], baseline_dampings: list[float]) -> dict[str, dict]:
    """name -> prune() options. cfsp sweeps the damping; the baselines get the same rule at fewer points."""
    table = {"cfsp none": dict(compensation="none"), DEFAULT: dict(compensation="mean")}
    table |= {f"cfsp refit d={d:g}": dict(compensation="refit", refit_damping=d) for d in dampings}
    table |= {  # a second pass each: chosen with --only
        f"cfsp refit+sequential d={d:g}": dict(compensation="refit", refit_damping=d, sequential=True)
        for d in dampings
    }
    for method, own in (("wanda-sp", "none"), ("flap", "mean")):
        table[f"{method} {own} (its default)"] = dict(method=method, compensation=own)
        table |= {
            f"{method} refit d={d:g}": dict(method=method, compensation="refit", refit_damping=d)
            for d in baseline_dampings
        }
    return table


def summary(rows: list[dict], table: dict, sparsities: list[float], seeds: list[int]) -> list[str]:
    lines = [
        "| candidate | sparsity | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs mean |",
        "|---|---|" + "---|" * (len(seeds) + 2),
    ]
    for sparsity in sparsities:
        base = statistics.mean(
            r["ppl"] for r in rows if r["candidate"] == DEFAULT and r["sparsity"] == sparsity
        )
        for name in table:
            ppls = [r["ppl"] for r in rows if r["candidate"] == name and r["sparsity"] == sparsity]
            mean = statistics.mean(ppls)
            cells = " | ".join(f"{p:.2f}" for p in ppls)
            lines.append(
                f"| {name} | {sparsity:.2f} | {cells} | {mean:.2f} | {100 * (mean / base - 1):+.1f} % |"
            )
    return lines


def measure_cost(model_name: str, args) -> dict:
    """Forward pass, calibration, and calibration with Gram matrices, interleaved twice (medians)."""
    setup = prepare(model_name, args.nsamples, args.seqlen, time_forward=False, second_moments=False)
    times: dict[str, list[float]] = {"forward_s": [], "calibration_s": [], "calibration_with_gram_s": []}
    for _ in range(2):
        times["forward_s"].append(forward_pass_seconds(setup.model, setup.calib, batch_size=8))
        for key, gram in (("calibration_s", False), ("calibration_with_gram_s", True)):
            _, cost = pruning_cost(
                calibrate, setup.model, setup.calib, 8, second_moments=gram, progress=False
            )
            times[key].append(cost["seconds"])
    row = {key: statistics.median(values) for key, values in times.items()}
    row["calibration_over_forward"] = row["calibration_s"] / row["forward_s"]
    row["calibration_with_gram_over_forward"] = row["calibration_with_gram_s"] / row["forward_s"]
    row["tokens"] = setup.calib.numel()
    print(model_name, row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", required=True)
    add_protocol_arguments(parser)
    parser.add_argument("--seed", type=int, action="append")
    parser.add_argument("--sparsity", type=float, action="append")
    parser.add_argument("--damping", type=float, action="append", help="cfsp refit dampings")
    parser.add_argument("--only", help="comma-separated candidate names (the default always runs)")
    parser.add_argument("--tag", help="suffix of the result files")
    parser.add_argument(
        "--baseline-damping", type=float, action="append", help="wanda-sp / flap refit dampings"
    )
    parser.add_argument(
        "--cost-only", action="store_true", help="only time the passes (results/refit_cost.json)"
    )
    args = parser.parse_args()
    if args.cost_only:
        write_json(RESULTS / "refit_cost.json", {name: measure_cost(name, args) for name in args.model})
        return
    seeds, sparsities = args.seed or [0, 1], args.sparsity or [0.2, 0.5]
    table = candidates(args.damping or [1e-4, 1e-3, 1e-2, 1e-1], args.baseline_damping or [1e-2, 1e-1])
    names = [DEFAULT, *args.only.split(",")] if args.only else [n for n in table if "sequential" not in n]
    table = {name: table[name] for name in dict.fromkeys(names)}
    for model_name in args.model:
        rows, cost = [], {}
        for seed in seeds:
            first = seed == seeds[0]
            setup = prepare(
                model_name, args.nsamples, args.seqlen, seed=seed, time_forward=first, second_moments=True
            )
            if first:
                _, plain = pruning_cost(calibrate, setup.model, setup.calib, 8, progress=False)
                cost = dict(
                    forward_s=setup.forward_seconds,
                    calibration_s=plain["seconds"],
                    calibration_with_gram_s=setup.calib_seconds,
                    peak_rss_mb_with_gram=setup.calib_peak_mb,
                )
                dense = wikitext_ppl(setup.model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
                rows.append(dict(candidate="dense", sparsity=0.0, seed=None, ppl=dense))
                print(f"{model_name} dense ppl {dense:.2f}; cost {cost}", flush=True)
            for sparsity in sparsities:
                for name, options in table.items():
                    started = time.perf_counter()
                    model, result = pruned_variant(setup, sparsity, **options)
                    prune_s = time.perf_counter() - started
                    ppl = wikitext_ppl(model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
                    rows.append(
                        dict(
                            candidate=name,
                            sparsity=sparsity,
                            seed=seed,
                            ppl=ppl,
                            options=options,
                            realised_sparsity=result.realised_sparsity,
                            prune_after_calibration_s=prune_s,
                        )
                    )
                    print(f"{model_name} seed {seed} p={sparsity} {name:28s} ppl {ppl:9.2f}", flush=True)
                    del model
            del setup
        payload = dict(
            model=model_name,
            when=stamp(),
            calibration=dict(n=args.nsamples, length=args.seqlen, source="wikitext2 validation", seeds=seeds),
            ppl=dict(split="wikitext2 test", windows=args.ppl_windows, seqlen=args.ppl_seqlen),
            cost=cost,
            rows=rows,
        )
        suffix = f"_{args.tag}" if args.tag else ""
        write_json(RESULTS / f"refit_{model_name}{suffix}.json", payload)
        header = [
            f"# Compensation on {model_name} (dense ppl {rows[0]['ppl']:.2f})",
            "",
            f"Calibration {args.nsamples} x {args.seqlen} WikiText-2 validation per seed; WikiText-2 test "
            f"perplexity on {args.ppl_windows} windows of {args.ppl_seqlen}.",
            "",
        ]
        text = "\n".join(header + summary(rows, table, sparsities, seeds)) + "\n"
        (RESULTS / f"refit_{model_name}{suffix}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
