"""The method comparison: CFSP against Wanda-SP, FLAP and Magnitude-SP at the same FFN sparsity.

For each model: one dense model, one calibration pass shared by every method (all score dense
activations), then per sparsity and method a pruned copy scored on the same WikiText-2 test windows
and the same zero-shot subsets, with its parameter count, pruning cost and decode speed-up.
Writes results/methods_<model>.json, results/methods_<model>.md and two PNG plots per model.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, add_protocol_arguments, prepare, pruned_variant, stamp, wikitext_ppl, write_json  # noqa: E402

from cfsp.evaluation import HEADLINE_METRIC, evaluate  # noqa: E402
from cfsp.models import count_parameters  # noqa: E402
from cfsp.speed import speed_benchmark  # noqa: E402

ZERO_SHOT = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
# label -> prune() options. "cfsp-reference" is the reference configuration (its channel metric,
# its temperature, per-block rounding, no bias compensation), the bar the defaults must beat.
METHODS: dict[str, dict] = {
    "cfsp": dict(method="cfsp"),
    "cfsp-reference": dict(
        method="cfsp",
        channel_metric="cfsp_paper",
        temperature=13.1072,
        compensation="none",
        rounding="nearest",
    ),
    "wanda-sp": dict(method="wanda-sp"),
    "flap": dict(method="flap"),
    "magnitude-sp": dict(method="magnitude-sp"),
}


def zero_shot_scores(model, tokenizer, limit: int) -> tuple[dict, float]:
    evaluation = evaluate(model, tokenizer, tasks=ZERO_SHOT, limit=limit, batch_size=8)
    scores = {
        task: evaluation["results"][task][HEADLINE_METRIC[task]]
        for task in ZERO_SHOT
        if task in evaluation["results"]
    }
    return scores, evaluation["zero_shot_mean"]


def decode_speedup(dense, pruned) -> float:
    result = speed_benchmark(
        dense, pruned, batch_sizes=(1,), prompt_lengths=(64,), decode_tokens=16, repeats=3
    )
    return result["rows"][0]["decode_speedup"]


def run_model(name: str, args) -> list[dict]:
    setup = prepare(name, args.nsamples, args.seqlen)
    dense_params = count_parameters(setup.model)
    scores, mean = zero_shot_scores(setup.model, setup.tokenizer, args.limit)
    rows = [
        dict(
            model=name,
            method="dense",
            sparsity=0.0,
            realised_sparsity=0.0,
            ppl_wikitext2=wikitext_ppl(setup.model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen),
            zero_shot=scores,
            zero_shot_mean=mean,
            params=dense_params,
            prune_seconds=0.0,
            peak_mem_mb=None,
            decode_speedup=1.0,
        )
    ]
    print(rows[-1], flush=True)
    cfsp_results = {}
    for sparsity in args.sparsities:
        for label in args.methods:
            model, result = pruned_variant(setup, sparsity, **METHODS[label])
            calibrated = result.block_importance is not None  # None: the method used weights only
            prune_seconds = result.seconds + (setup.calib_seconds if calibrated else 0.0)
            scores, mean = zero_shot_scores(model, setup.tokenizer, args.limit)
            rows.append(
                dict(
                    model=name,
                    method=label,
                    sparsity=sparsity,
                    realised_sparsity=result.realised_sparsity,
                    ppl_wikitext2=wikitext_ppl(model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen),
                    zero_shot=scores,
                    zero_shot_mean=mean,
                    params=result.params_after,
                    prune_seconds=prune_seconds,
                    prune_to_forward_ratio=prune_seconds / setup.forward_seconds,
                    peak_mem_mb=setup.calib_peak_mb if calibrated else None,
                    decode_speedup=decode_speedup(setup.model, model),
                    param_ceiling=dense_params / result.params_after,
                    widths=result.widths,
                    options=result.options,
                )
            )
            print({k: v for k, v in rows[-1].items() if k not in ("widths", "options")}, flush=True)
            if label == "cfsp":
                cfsp_results[sparsity] = result
            del model
    meta = dict(
        when=stamp(),
        calibration=dict(
            source="wikitext2 validation",
            n=args.nsamples,
            length=args.seqlen,
            seed=0,
            seconds=setup.calib_seconds,
            plain_forward_seconds=setup.forward_seconds,
            peak_rss_mb=setup.calib_peak_mb,
        ),
        ppl=dict(split="wikitext2 test", windows=args.ppl_windows, seqlen=args.ppl_seqlen),
        zero_shot=dict(
            tasks=ZERO_SHOT,
            limit=args.limit,
            subset="first N examples of each task file",
            metric=HEADLINE_METRIC,
        ),
        decode=dict(batch_size=1, prompt_length=64, new_tokens=16, repeats=3),
        prune_seconds="shared calibration pass + the method's own scoring and surgery",
    )
    write_json(RESULTS / f"methods_{name}.json", dict(meta=meta, rows=rows))
    write_markdown(name, rows, meta)
    plot(name, rows, cfsp_results)
    return rows


def write_markdown(name: str, rows: list[dict], meta: dict) -> None:
    tasks = ZERO_SHOT
    head = "| method | sparsity | realised | params (M) | WikiText-2 ppl | " + " | ".join(tasks)
    head += " | zero-shot mean | prune s | decode speed-up |"
    lines = [f"# Methods on {name}", "", head, "|" + "---|" * (len(tasks) + 8)]
    for r in rows:
        cells = [f"{r['zero_shot'].get(t, float('nan')) * 100:.1f}" for t in tasks]
        lines.append(
            f"| {r['method']} | {r['sparsity']:.2f} | {r['realised_sparsity']:.3f} | {r['params'] / 1e6:.1f} | "
            f"{r['ppl_wikitext2']:.2f} | " + " | ".join(cells) + f" | {r['zero_shot_mean'] * 100:.1f} | "
            f"{r['prune_seconds']:.0f} | {r['decode_speedup']:.2f}x |"
        )
    lines += [
        "",
        f"Calibration: {meta['calibration']}",
        f"Perplexity: {meta['ppl']}",
        f"Zero-shot: {meta['zero_shot']}",
    ]
    (RESULTS / f"methods_{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(name: str, rows: list[dict], cfsp_results: dict) -> None:
    if cfsp_results:
        sparsity = max(cfsp_results)
        result = cfsp_results[sparsity]
        fig, left = plt.subplots(figsize=(8, 4))
        blocks = range(len(result.widths))
        left.bar(blocks, result.widths, color="tab:blue", alpha=0.6, label="kept FFN width")
        left.set_xlabel("block")
        left.set_ylabel("kept width")
        right = left.twinx()
        right.plot(blocks, result.block_importance, color="tab:red", marker="o", label="importance")
        right.set_ylabel("mean angular distance per token")
        left.set_title(f"CFSP on {name} at {sparsity:.0%} FFN sparsity")
        fig.tight_layout()
        fig.savefig(RESULTS / f"cfsp_blocks_{name}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r for r in rows if r["method"] == "dense")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        points = sorted((r["sparsity"], r["ppl_wikitext2"]) for r in rows if r["method"] == method)
        ax.plot(
            [0.0] + [p for p, _ in points],
            [dense["ppl_wikitext2"]] + [q for _, q in points],
            marker="o",
            label=method,
        )
    ax.set_yscale("log")
    ax.set_xlabel("FFN sparsity")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"ppl_vs_sparsity_{name}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", required=True)
    add_protocol_arguments(parser)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    for name in args.model:
        run_model(name, args)


if __name__ == "__main__":
    main()
