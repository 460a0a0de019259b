"""The family table: every supported family, from its real config, through every check.

Runs the checks of ``tests/test_families.py`` (``check_family``: prune in memory, streamed == in
memory, reload, stock transformers load, eval) on each family's tiny model and writes
``results/families.{json,md}``, the table the README shows.

    python benchmarks/families.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_models import CONFIG_DIR, DEFAULT_CONFIGS, REAL_CONFIGS  # noqa: E402
from test_families import check_family, check_stock_loads  # noqa: E402

from cfsp.export import EXPORTABLE  # noqa: E402
from cfsp.outdir import dumps, write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MARK = {True: "✔", False: "✘"}


def main() -> None:
    torch.set_num_threads(1)
    calib = torch.randint(4, 260, (16, 64), generator=torch.Generator().manual_seed(0))
    names = REAL_CONFIGS + DEFAULT_CONFIGS
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {name: Path(tmp) / name for name in names}
        for name, root in roots.items():
            root.mkdir()
            rows[name] = check_family(name, root, calib)
            print(name, rows[name]["model_type"], rows[name]["mlp"], flush=True)
        same, _ = check_stock_loads(list(roots.values()), calib[:2, :40])
    for name, ok in zip(names, same, strict=True):
        rows[name]["stock_load"] = ok
        rows[name].pop("stock_error", None)
        rows[name]["config"] = (
            "published config.json" if (CONFIG_DIR / f"{name}.json").is_file() else "class defaults"
        )
    write_text_atomic(RESULTS / "families.json", dumps(rows, indent=1))
    lines = [
        "| family (config) | model_type | MLP | prune in memory | streamed = in memory | reload | stock load "
        "(remote code) | eval | `--uniform`: plain transformers | GGUF (llama.cpp deci) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        checks = [row[key] for key in ("pruned", "streamed", "reload", "stock_load", "eval", "uniform_stock")]
        gguf = "✔" if row["model_type"] in EXPORTABLE else "—"
        source = name if row["config"] == "published config.json" else f"{name} (class defaults)"
        lines.append(
            f"| {source} | {row['model_type']} | {row['mlp']} | "
            + " | ".join(MARK[c] for c in checks)
            + f" | {gguf} |"
        )
    write_text_atomic(RESULTS / "families.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
