"""The token curve of recovery: how much of the pruning gap distillation closes per token trained.

SmolLM2 pruned 50 % by cfsp's defaults (refit) and, for one variant, by the reconstruct
compensation; each is distilled from the dense model (``--objective kd``) on general text streamed
from a corpus folder (WikiText-2 *validation*: neither instructions nor the evaluation split), with
a constant learning rate, and scored on WikiText-2 test windows after each budget of tokens. The
budgets are reached by resuming one run from its checkpoints, so each point continues the last.
What trains: LoRA adapters (IG-LoRA ranks), the MLP weights, or every block weight.

Each seed is a calibration seed (a different pruned model) and the recovery seed. Points are
written as they come, so an interrupted run keeps them and ``--resume`` skips them. Writes
results/recovery_curve_<model>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, prepare, pruned_variant, stamp, wikitext_ppl, write_json

from cfsp.recovery import DEFAULT_LR, RecoveryConfig, recover, resolve_recovery_source

TRAINED = {"LoRA": "lora", "MLP weights": "mlp", "all block weights": "all"}


def gap_closed(dense: float, before: float, after: float) -> float:
    """Fraction of the log-perplexity gap between pruned and dense that recovery closed."""
    return (math.log(before) - math.log(after)) / (math.log(before) - math.log(dense))


def corpus_folder(root: Path, names: list[str]) -> Path:
    """A corpus folder of the named shipped sets, one shard each: recovery reads it as a stream."""
    folder = root / "corpus"
    folder.mkdir()
    for index, name in enumerate(names):
        given = Path(name).expanduser()
        paths = (
            sorted(p for p in given.rglob("*") if p.is_file())
            if given.is_dir()
            else resolve_recovery_source(name)
        )
        for number, path in enumerate(paths):
            (folder / f"{index:02d}-{number:05d}-{path.name}").symlink_to(path.resolve())
    return folder


def curve(
    args, setup, pruned, importance, trained: str, seed: int, corpus: Path, checkpoints: Path, emit
) -> None:
    """One recovery run, scored after every budget in ``args.tokens``."""
    per_step = args.batch_size * args.seqlen
    done_tokens = 0
    for target in args.tokens:
        steps = target // per_step
        config = RecoveryConfig(
            train=trained,
            objective="kd",
            steps=steps,
            batch_size=args.batch_size,
            grad_accum=1,
            seqlen=args.seqlen,
            lr=DEFAULT_LR[trained],
            lr_scheduler="constant",
            save_steps=steps,
            save_total_limit=1,
            logging_steps=max(1, steps // 4),
            seed=seed,
            bf16=args.bf16,
        )
        began = time.perf_counter()
        result = recover(
            copy.deepcopy(pruned),
            setup.tokenizer,
            corpus,
            importance,
            config,
            output_dir=checkpoints,
            resume=done_tokens > 0,
            teacher=setup.model,
        )
        ppl = wikitext_ppl(result.model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
        segment, done_tokens = result.tokens_seen - done_tokens, result.tokens_seen
        emit(
            dict(
                tokens=result.tokens_seen,
                ppl=ppl,
                trainable_params=result.trainable_params,
                train_seconds=result.train_seconds,
                tokens_per_s=segment / result.train_seconds,
                seconds=time.perf_counter() - began,
                final_loss=result.final_loss,
            )
        )


def write_tables(path: Path, meta: dict, rows: list[dict]) -> None:
    write_json(path.with_suffix(".json"), dict(meta=meta, rows=rows))
    dense = meta["dense_ppl"]
    lines = [
        f"# Recovery token curve: {meta['model']} pruned 50 %, distilled from the dense model",
        "",
        f"Data: {meta['data']} streamed in {meta['seqlen']}-token windows, {meta['batch_size']} per step; "
        f"constant learning rate (LoRA {DEFAULT_LR['lora']}, weights {DEFAULT_LR['mlp']}); WikiText-2 test "
        f"{meta['ppl_windows']} x {meta['ppl_seqlen']}. Dense perplexity {dense:.2f}. Gap closed = share of the "
        "log-perplexity gap between the pruned start and the dense model.",
        "",
        "| start | trained | seed | tokens | perplexity | gap closed % | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['start']} | {row['trained']} | {row['seed']} | {row['tokens']:,} | {row['ppl']:.2f} | "
            f"{100 * row['gap_closed']:.1f} | {row['tokens_per_s']:,.0f} |"
        )
    ends = {}
    for row in rows:
        key = (row["start"], row["trained"])
        if row["tokens"] == max(r["tokens"] for r in rows if (r["start"], r["trained"]) == key):
            ends.setdefault(key, []).append(100 * row["gap_closed"])
    lines += ["", "At the largest budget each ran to (mean ± std over seeds):", ""]
    lines += ["| start | trained | seeds | gap closed % |", "|---|---|---|---|"]
    for (start, trained), values in ends.items():
        std = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        lines.append(f"| {start} | {trained} | {len(values)} | {statistics.fmean(values):.1f}{std} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(path.with_suffix(".png"), meta, rows)


def plot(path: Path, meta: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["start"], r["trained"], r["seed"]) for r in rows):
        points = sorted(
            (r["tokens"], 100 * r["gap_closed"]) for r in rows if (r["start"], r["trained"], r["seed"]) == key
        )
        style = "-" if key[0] == "refit" else "--"
        axis.plot(
            *zip(*points, strict=True), style, marker="o", label=f"{key[1]}, {key[0]} start, seed {key[2]}"
        )
    axis.set_xscale("log")
    axis.set_xlabel("tokens distilled")
    axis.set_ylabel("log-perplexity gap closed (%)")
    axis.set_title(f"{meta['model']} at 50 %: distillation from the dense model")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", default="8192,16384,32768,65536", help="budgets at which to score")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--trained", default=",".join(TRAINED), help="what trains: " + ", ".join(TRAINED))
    parser.add_argument(
        "--reconstruct", default="LoRA", help="what trains from the reconstruct start (seed 0)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=32)
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument(
        "--corpus", default="wikitext2", help="shipped text sets or corpus folders, comma-separated"
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (a GPU)")
    parser.add_argument("--suffix", default="", help="added to the result file names")
    parser.add_argument("--resume", action="store_true", help="keep the rows of an earlier run and skip them")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    path = RESULTS / f"recovery_curve_{args.model}{args.suffix}"
    import json

    rows = (
        json.loads(path.with_suffix(".json").read_text())["rows"]
        if args.resume and path.with_suffix(".json").exists()
        else []
    )
    meta = dict(
        when=stamp(),
        model=args.model,
        data=f"{args.corpus} (a corpus folder)",
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        ppl_windows=args.ppl_windows,
        ppl_seqlen=args.ppl_seqlen,
    )
    plan = []
    for seed in (int(s) for s in args.seeds.split(",")):
        plan += [("refit", label, seed) for label in args.trained.split(",")]
        if seed == 0 and args.reconstruct:
            plan += [("reconstruct", label, seed) for label in args.reconstruct.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = corpus_folder(work, args.corpus.split(","))
        setups: dict[int, object] = {}
        starts: dict[tuple[str, int], tuple] = {}
        for start, label, seed in plan:
            if len([r for r in rows if (r["start"], r["trained"], r["seed"]) == (start, label, seed)]) == len(
                args.tokens
            ):
                continue
            rows[:] = [r for r in rows if (r["start"], r["trained"], r["seed"]) != (start, label, seed)]
            if seed not in setups:
                setups[seed] = prepare(args.model, 32, 512, seed=seed, time_forward=False)
            setup = setups[seed]
            meta["dense_ppl"] = meta.get("dense_ppl") or wikitext_ppl(
                setup.model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen
            )
            if (start, seed) not in starts:
                model, result = pruned_variant(setup, 0.5, compensation=start)
                before = wikitext_ppl(model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
                starts[start, seed] = (model, result.block_importance, before)
            model, importance, before = starts[start, seed]
            print(f"{start} start, {label}, seed {seed}: pruned perplexity {before:.2f}", flush=True)

            def emit(point, start=start, label=label, seed=seed, before=before, rows=rows):
                row = dict(start=start, trained=label, seed=seed, ppl_before=before, **point)
                row["gap_closed"] = gap_closed(meta["dense_ppl"], before, point["ppl"])
                rows.append(row)
                print(
                    f"  {point['tokens']:>8,} tokens: perplexity {point['ppl']:.2f}, gap closed {100 * row['gap_closed']:.1f} %",
                    flush=True,
                )
                write_tables(path, meta, rows)

            curve(
                args,
                setup,
                model,
                importance,
                TRAINED[label],
                seed,
                corpus,
                work / f"{start}-{label}-{seed}",
                emit,
            )


if __name__ == "__main__":
    main()
