"""IG-LoRA vs uniform LoRA at the same trainable-parameter budget, on SmolLM2 pruned 50 % by CFSP.

Both runs start from the same pruned model and use the same data, steps, learning rate and seed;
only the per-block ranks differ. Perplexity and zero-shot subsets are those of methods.py.
Writes results/recovery_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

from common import RESULTS, add_protocol_arguments, prepare, pruned_variant, stamp, wikitext_ppl, write_json
from methods import zero_shot_scores

from cfsp.recovery import RecoveryConfig, recover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsity", type=float, default=0.5)
    add_protocol_arguments(parser)
    parser.add_argument(
        "--data", default="wikitext2", help="recovery data (wikitext2 = the validation split)"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seqlen", type=int, default=128)
    args = parser.parse_args()

    setup = prepare(args.model, args.nsamples, args.seqlen)
    pruned, result = pruned_variant(setup, args.sparsity, method="cfsp")
    del setup.model, setup.stats
    ppl_before = wikitext_ppl(pruned, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
    scores_before, zero_before = zero_shot_scores(pruned, setup.tokenizer, args.limit)
    print(f"before: ppl {ppl_before:.2f} zero-shot {zero_before:.4f}", flush=True)
    rows = []
    for allocation in ("importance", "uniform"):
        config = RecoveryConfig(
            rank=args.rank,
            allocation=allocation,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            grad_accum=1,
            seqlen=args.train_seqlen,
            seed=0,
            logging_steps=10,
            save_steps=args.steps,
        )
        with tempfile.TemporaryDirectory() as checkpoints:
            recovered = recover(
                copy.deepcopy(pruned),
                setup.tokenizer,
                args.data,
                result.block_importance,
                config,
                output_dir=checkpoints,
            )
        ppl_after = wikitext_ppl(recovered.model, setup.tokenizer, args.ppl_windows, args.ppl_seqlen)
        scores_after, zero_after = zero_shot_scores(recovered.model, setup.tokenizer, args.limit)
        rows.append(
            dict(
                model=args.model,
                allocation=allocation,
                rank=args.rank,
                ranks=recovered.ranks,
                trainable_params=recovered.trainable_params,
                uniform_params=recovered.uniform_params,
                steps=recovered.steps,
                final_loss=recovered.final_loss,
                train_loss=recovered.train_loss,
                ppl_before=ppl_before,
                ppl_after=ppl_after,
                zero_shot_before=zero_before,
                zero_shot_after=zero_after,
                zero_shot_tasks_before=scores_before,
                zero_shot_tasks_after=scores_after,
            )
        )
        print({k: v for k, v in rows[-1].items() if not k.startswith("zero_shot_tasks")}, flush=True)
    meta = dict(
        when=stamp(),
        pruning=dict(
            method="cfsp",
            sparsity=args.sparsity,
            options=result.options,
            realised_sparsity=result.realised_sparsity,
            widths=result.widths,
        ),
        data=args.data,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        train_seqlen=args.train_seqlen,
        seed=0,
        ppl=dict(split="wikitext2 test", windows=args.ppl_windows, seqlen=args.ppl_seqlen),
        zero_shot_limit=args.limit,
    )
    write_json(RESULTS / f"recovery_{args.model}.json", dict(meta=meta, rows=rows))
    lines = [
        f"# Recovery on {args.model} pruned {args.sparsity:.0%} by CFSP",
        "",
        "| allocation | rank | trainable params | steps | ppl before | ppl after | zero-shot before | zero-shot after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['allocation']} | {r['rank']} | {r['trainable_params']:,} | {r['steps']} | {r['ppl_before']:.2f} | "
            f"{r['ppl_after']:.2f} | {r['zero_shot_before'] * 100:.1f} | {r['zero_shot_after'] * 100:.1f} |"
        )
    lines += ["", f"Settings: {meta}"]
    (RESULTS / f"recovery_{args.model}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
