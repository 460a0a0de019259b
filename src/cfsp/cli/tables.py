"""Tables the commands print."""

from __future__ import annotations

from rich.table import Table


def summary_table(result) -> Table:
    """Per-block importance, keep fraction and width, as decided by ``prune``."""
    table = Table(title=f"{result.method}: per-block FFN widths", show_lines=False)
    for column in ("block", "importance", "keep", "width", "of"):
        table.add_column(column, justify="right")
    importance = result.block_importance or [None] * len(result.widths)
    for i, (imp, keep, width, full) in enumerate(
        zip(importance, result.keep_fractions, result.widths, result.original_widths, strict=True)
    ):
        table.add_row(str(i), "-" if imp is None else f"{imp:.4f}", f"{keep:.3f}", str(width), str(full))
    return table


def totals_table(result, cost: dict | None = None) -> Table:
    table = Table(show_header=False, box=None)
    table.add_row("target FFN sparsity", f"{result.target_sparsity:.3f}")
    table.add_row("realised FFN sparsity", f"{result.realised_sparsity:.3f}")
    table.add_row("parameters before", f"{result.params_before:,}")
    table.add_row(
        "parameters after", f"{result.params_after:,} ({result.params_after / result.params_before:.3f}x)"
    )
    table.add_row("pruning time", f"{result.seconds:.1f} s")
    if cost is not None:
        table.add_row("peak memory (process RSS)", f"{cost['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return table
