"""Recovery after pruning: uniform LoRA, IG-LoRA, IG-LoRA + distillation, MLP fine-tune + distillation.

SmolLM2 pruned 50 % by cfsp's defaults, once; every variant starts from a copy of that model and
sees the same instruction data (gpteacher_roleplay + dolly_hhrlhf_small, never WikiText), the same
steps, batch size and sequence length (so the same examples and tokens for a given seed), and is
scored on the same WikiText-2 test windows and the same first examples of the seven zero-shot
tasks. The two LoRA variants have the same trainable-parameter budget. The seed is the recovery
seed (data order, LoRA init, dropout); the pruned model is the same for all.

Rows are written after every run, seed by seed, so an interrupted run keeps its finished rows and
``--resume`` continues it. Writes results/recovery_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile

from common import RESULTS, add_protocol_arguments, prepare, pruned_variant, stamp, wikitext_ppl, write_json
from methods import zero_shot_scores

from cfsp.recovery import DEFAULT_LR, RecoveryConfig, load_recovery_data, recover

# label -> RecoveryConfig fields (learning rate chosen per kind of training, see --lora-lr/--mlp-lr)
VARIANTS: dict[str, dict] = {
    "uniform LoRA": dict(train="lora", allocation="uniform", objective="lm"),
    "IG-LoRA": dict(train="lora", allocation="importance", objective="lm"),
    "IG-LoRA + KD": dict(train="lora", allocation="importance", objective="kd"),
    "MLP fine-tune + KD": dict(train="mlp", objective="kd"),
}


def gap_closed(ppl_dense: float, ppl_before: float, ppl_after: float) -> float:
    """Fraction of the log-perplexity gap between pruned and dense that recovery closed."""
    return (math.log(ppl_before) - math.log(ppl_after)) / (math.log(ppl_before) - math.log(ppl_dense))


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.2f} ± {std:.2f}"


def write_tables(path, meta: dict, rows: list[dict]) -> None:
    """The JSON rows and a markdown summary: mean ± std over seeds per variant."""
    write_json(path.with_suffix(".json"), dict(meta=meta, rows=rows))
    dense, before = meta["dense"], meta["before"]
    lines = [
        f"# Recovery on {meta['model']} pruned {meta['pruning']['sparsity']:.0%} by cfsp",
        "",
        f"Data {meta['data']}; {meta['steps']} steps x {meta['batch_size']} examples of <= {meta['train_seqlen']} "
        f"tokens; WikiText-2 test {meta['ppl']['windows']} x {meta['ppl']['seqlen']}; zero-shot first "
        f"{meta['zero_shot_limit']} examples of each of 7 tasks. Mean ± std over seeds.",
        "",
        "| variant | seeds | trainable params | tokens | ppl | gap closed % | zero-shot mean % |",
        "|---|---|---|---|---|---|---|",
        f"| dense | - | - | - | {dense['ppl']:.2f} | 100 | {dense['zero_shot'] * 100:.2f} |",
        f"| pruned, not recovered | - | - | - | {before['ppl']:.2f} | 0 | {before['zero_shot'] * 100:.2f} |",
    ]
    for label in VARIANTS:
        runs = [r for r in rows if r["variant"] == label]
        if not runs:
            continue
        lines.append(
            f"| {label} | {len(runs)} | {runs[0]['trainable_params']:,} | {round(statistics.fmean(r['tokens'] for r in runs)):,} | "
            f"{spread([r['ppl_after'] for r in runs])} | {spread([100 * r['gap_closed'] for r in runs])} | "
            f"{spread([100 * r['zero_shot_after'] for r in runs])} |"
        )
    lines += ["", "Per task (mean over seeds, %):", ""]
    tasks = list(dense["zero_shot_tasks"])
    lines += ["| variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    table = [("dense", [dense]), ("pruned", [before])]
    table += [(label, [r for r in rows if r["variant"] == label]) for label in VARIANTS]
    for label, runs in table:
        if runs:
            key = "zero_shot_tasks" if label in ("dense", "pruned") else "zero_shot_tasks_after"
            cells = [f"{100 * statistics.fmean(r[key][t] for r in runs):.1f}" for t in tasks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsity", type=float, default=0.5)
    add_protocol_arguments(parser)
    parser.set_defaults(ppl_windows=32, limit=200)
    parser.add_argument("--data", default="instructions")
    parser.add_argument("--compensation", help="prune with this compensation (default: cfsp's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lora-lr", type=float, default=DEFAULT_LR["lora"])
    parser.add_argument("--mlp-lr", type=float, default=DEFAULT_LR["mlp"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument("--resume", action="store_true", help="keep the rows of an earlier run")
    parser.add_argument("--name", help="results file stem (default: recovery_<model>)")
    parser.add_argument(
        "--baselines", help="take the dense and unrecovered scores from this earlier results file"
    )
    args = parser.parse_args()
    path = RESULTS / f"{args.name or f'recovery_{args.model}'}.json"

    setup = prepare(args.model, args.nsamples, args.seqlen, time_forward=False)
    compensation = {"compensation": args.compensation} if args.compensation else {}
    pruned, result = pruned_variant(setup, args.sparsity, method="cfsp", **compensation)
    dense = setup.model
    del setup.stats
    rows: list[dict] = []
    previous = json.loads(path.read_text()) if args.resume and path.exists() else None
    baselines = json.loads(open(args.baselines).read())["meta"] if args.baselines else None
    for stored in (previous and previous["meta"], baselines):
        if stored and (
            stored["pruning"]["widths"] != result.widths
            or stored["pruning"]["options"].get("compensation") != result.options["compensation"]
            or stored["ppl"]["windows"] != args.ppl_windows
            or stored["zero_shot_limit"] != args.limit
        ):
            raise SystemExit("the stored results come from another pruned model or protocol")
    if previous is not None:
        meta, rows = previous["meta"], previous["rows"]
        if meta["steps"] != args.steps:
            raise SystemExit("the stored rows come from other settings; run without --resume")
    else:
        evaluated = {}
        for name, model in (("dense", dense), ("before", pruned)):
            if baselines is not None:
                evaluated[name] = baselines[name]
                continue
            scores, mean = zero_shot_scores(model, setup.tokenizer, args.limit)
            ppl = wikitext_ppl(model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
            evaluated[name] = dict(ppl=ppl, zero_shot=mean, zero_shot_tasks=scores)
            print(name, evaluated[name], flush=True)
        meta = dict(
            when=stamp(),
            model=args.model,
            pruning=dict(method="cfsp", sparsity=args.sparsity, options=result.options, widths=result.widths),
            calibration=dict(windows=args.nsamples, seqlen=args.seqlen, seed=0),
            data=args.data,
            steps=args.steps,
            batch_size=args.batch_size,
            train_seqlen=args.train_seqlen,
            lr=dict(lora=args.lora_lr, mlp=args.mlp_lr),
            rank=args.rank,
            kd_temperature=args.kd_temperature,
            ppl=dict(split="wikitext2 test", windows=args.ppl_windows, seqlen=args.ppl_seqlen),
            zero_shot_limit=args.limit,
            **evaluated,
        )
    data = load_recovery_data(args.data, setup.tokenizer, args.train_seqlen)
    meta["data_examples"] = data.describe()
    done = {(r["variant"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for label in args.variants:
            if (label, seed) in done:
                continue
            options = VARIANTS[label]
            config = RecoveryConfig(
                rank=args.rank,
                steps=args.steps,
                lr=args.mlp_lr if options["train"] == "mlp" else args.lora_lr,
                batch_size=args.batch_size,
                grad_accum=1,
                seqlen=args.train_seqlen,
                warmup_steps=max(1, args.steps // 10),
                seed=seed,
                logging_steps=10,
                save_steps=args.steps,
                kd_temperature=args.kd_temperature,
                **options,
            )
            with tempfile.TemporaryDirectory() as checkpoints:
                recovered = recover(
                    copy.deepcopy(pruned),
                    setup.tokenizer,
                    data,
                    result.block_importance,
                    config,
                    output_dir=checkpoints,
                    teacher=dense if config.objective != "lm" else None,
                )
            ppl = wikitext_ppl(recovered.model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
            scores, mean = zero_shot_scores(recovered.model, setup.tokenizer, args.limit)
            rows.append(
                dict(
                    variant=label,
                    allocation=recovered.allocation,
                    objective=config.objective,
                    train=config.train,
                    seed=seed,
                    rank=args.rank if config.train == "lora" else None,
                    ranks=recovered.ranks,
                    trainable_params=recovered.trainable_params,
                    tokens=recovered.tokens_seen,
                    steps=recovered.steps,
                    lr=config.lr,
                    train_loss=recovered.train_loss,
                    final_loss=recovered.final_loss,
                    ppl_dense=meta["dense"]["ppl"],
                    ppl_before=meta["before"]["ppl"],
                    ppl_after=ppl,
                    gap_closed=gap_closed(meta["dense"]["ppl"], meta["before"]["ppl"], ppl),
                    zero_shot_dense=meta["dense"]["zero_shot"],
                    zero_shot_before=meta["before"]["zero_shot"],
                    zero_shot_after=mean,
                    zero_shot_tasks_after=scores,
                    train_seconds=recovered.train_seconds,
                )
            )
            print(
                {k: v for k, v in rows[-1].items() if k not in ("ranks", "zero_shot_tasks_after")}, flush=True
            )
            write_tables(path, meta, rows)


if __name__ == "__main__":
    main()
