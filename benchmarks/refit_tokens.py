"""How many calibration tokens the refit needs: mean bias vs refit as the calibration set shrinks.

The refit solves for one weight per kept channel and output from the calibration tokens; with too
few tokens it fits their noise. For each calibration size and seed, both rules prune a copy of the
same dense model at 50 % from the same statistics (the refit rule forced, whatever the token count)
and are scored on the same WikiText-2 test windows. Writes results/refit_tokens.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

from common import RESULTS, prepare, pruned_variant, stamp, wikitext_ppl, write_json

import cfsp.pruning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--windows", type=int, action="append", help="calibration windows of 512")
    parser.add_argument("--seed", type=int, action="append")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--ppl-windows", type=int, default=32)
    args = parser.parse_args()
    sizes, seeds = args.windows or [2, 4, 8, 16], args.seed or [0, 1]
    rows = []
    for n in sizes:
        for seed in seeds:
            setup = prepare(args.model, n, 512, seed=seed, time_forward=False)
            for rule in ("mean", "refit"):
                with mock.patch.object(cfsp.pruning, "refit_or_mean", lambda *_: "refit"):
                    model, result = pruned_variant(setup, args.sparsity, compensation=rule)
                ppl = wikitext_ppl(model, setup.tokenizer, args.ppl_windows, 512)
                kept = max(result.widths)
                rows.append(dict(windows=n, tokens=n * 512, seed=seed, rule=rule, ppl=ppl, widest_kept=kept))
                print(rows[-1], flush=True)
    write_json(
        RESULTS / "refit_tokens.json", dict(model=args.model, when=stamp(), sparsity=args.sparsity, rows=rows)
    )
    lines = [
        f"# Refit vs mean bias by calibration size ({args.model}, {args.sparsity:.0%} FFN sparsity)",
        "",
        f"WikiText-2 test perplexity on {args.ppl_windows} windows of 512, mean of seeds {seeds}.",
        "",
        "| calibration tokens | tokens per kept channel (widest block) | mean | refit | refit vs mean |",
        "|---|---|---|---|---|",
    ]
    for n in sizes:
        mean = statistics.mean(r["ppl"] for r in rows if r["windows"] == n and r["rule"] == "mean")
        refit = statistics.mean(r["ppl"] for r in rows if r["windows"] == n and r["rule"] == "refit")
        kept = max(r["widest_kept"] for r in rows if r["windows"] == n)
        lines.append(
            f"| {n * 512:,} | {n * 512 / kept:.1f} | {mean:.2f} | {refit:.2f} | {100 * (refit / mean - 1):+.1f} % |"
        )
    (RESULTS / "refit_tokens.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
