"""The mixture-of-experts family table: every MoE family, from its published config (or its config
class's defaults), through every check of expert pruning.

For each family's tiny model (``tests/real_models.make_moe_model``, SmolLM2's tokenizer so that
llama.cpp's converter knows it): remove half of the routed experts with REAP; check the logits
against the dense model with those experts masked out of routing; save; load with plain
``AutoModelForCausalLM.from_pretrained`` (no remote code) and compare; then convert with
llama.cpp's own converter and run it in llama.cpp (top-1 agreement and perplexity against
transformers on 64 WikiText-2 tokens). Writes ``results/moe_families.{json,md}``.

    python benchmarks/moe_families.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import llama_cpp_agreement  # noqa: E402
from real_models import MOE_CONFIGS, MOE_DEFAULT_CONFIGS, make_moe_model  # noqa: E402
from test_export import smollm2_tokenizer  # noqa: E402
from test_moe import masked_routing, removed_experts  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import cfsp  # noqa: E402
from cfsp.evaluation import wikitext_ids  # noqa: E402
from cfsp.experts import moe_blocks  # noqa: E402
from cfsp.export import export_gguf  # noqa: E402
from cfsp.models import decoder_blocks  # noqa: E402
from cfsp.outdir import dumps, write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MARK = {True: "✔", False: "✘", None: "—"}


def check(name: str, root: Path, tokenizer, calib: torch.Tensor, ids: torch.Tensor) -> dict:
    dense = make_moe_model(name, vocab=len(tokenizer))
    model = make_moe_model(name, vocab=len(tokenizer))
    moes = [m for m in moe_blocks(decoder_blocks(model)) if m is not None]
    row = {
        "model_type": model.config.model_type,
        "experts": moes[0].count,
        "top_k": moes[0].top_k,
        "groups": moes[0].groups,
        "moe_blocks": f"{len(moes)} of {len(decoder_blocks(model))}",
        "shared_expert": any("shared" in n for n, _ in moes[0].owner.named_children()),
    }
    plan = cfsp.prune(model, calib, expert_sparsity=0.5, progress=False)
    row["kept"] = plan.experts_after // len(moes)
    x = calib[:2, :32]
    with torch.no_grad(), masked_routing(dense, removed_experts(plan)):
        want = dense(x).logits
    with torch.no_grad():
        got = model(x).logits
    row["exact"] = bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))
    cfsp.save_pruned(model, tokenizer, plan, root / "out")
    config = json.loads((root / "out" / "config.json").read_text())
    try:
        stock = AutoModelForCausalLM.from_pretrained(root / "out", dtype=torch.float32).eval()
        with torch.no_grad():
            row["stock_load"] = "auto_map" not in config and bool(
                torch.allclose(stock(x).logits, got, rtol=1e-5, atol=1e-5)
            )
    except Exception as exc:  # noqa: BLE001 - the table records what failed
        row["stock_load"], row["stock_error"] = False, f"{type(exc).__name__}: {exc}"[:200]
    try:
        export_gguf(root / "out", root / "m.gguf", "f32", progress=False)
        row.update(llama_cpp_agreement(root / "m.gguf", model, ids))
        row["gguf"] = row["top1"] >= 0.98 and abs(row["ppl_llamacpp"] / row["ppl_transformers"] - 1) <= 0.01
    except BaseException as exc:  # noqa: BLE001 - includes the converter's SystemExit
        row["gguf"], row["gguf_error"] = False, f"{type(exc).__name__}: {exc}"[:300]
    return row


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = smollm2_tokenizer()
    calib = torch.randint(100, len(tokenizer), (8, 64), generator=torch.Generator().manual_seed(0))
    ids = wikitext_ids(tokenizer)[:64].reshape(1, 64)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MOE_CONFIGS + MOE_DEFAULT_CONFIGS:
            root = Path(tmp) / name
            root.mkdir()
            rows[name] = check(name, root, tokenizer, calib, ids)
            rows[name]["config"] = "published config.json" if name in MOE_CONFIGS else "class defaults"
            print(name, {k: rows[name][k] for k in ("exact", "stock_load", "gguf")}, flush=True)
    write_text_atomic(RESULTS / "moe_families.json", dumps(rows, indent=1))
    write_text_atomic(RESULTS / "moe_families.md", markdown(rows))
    print(markdown(rows))


def markdown(rows: dict) -> str:
    lines = [
        "| family (config) | model_type | routed experts (top-k, groups) | kept at 50 % | shared expert | "
        "= masked routing | stock load | GGUF (llama.cpp's converter, run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        source = name if row["config"] == "published config.json" else f"{name} (class defaults)"
        groups = f", {row['groups']} groups" if row["groups"] > 1 else ""
        if row["gguf"]:
            gguf = (
                f"✔ top-1 {row['top1']:.2f}, ppl {row['ppl_llamacpp']:.1f} vs {row['ppl_transformers']:.1f}"
            )
        else:  # the converter's own message, after the directory it names
            message = re.sub(r"/\S*/", "", row.get("gguf_error", "").split("/out: ")[-1])  # no folders
            gguf = "✘ " + message.replace("|", "/")[:70]
        lines.append(
            f"| {source} | {row['model_type']} | {row['experts']} (top-{row['top_k']}{groups}) | {row['kept']} | "
            f"{MARK[row['shared_expert']]} | {MARK[row['exact']]} | {MARK[row['stock_load']]} | {gguf} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
