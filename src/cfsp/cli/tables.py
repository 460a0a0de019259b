"""Tables the commands print."""

from __future__ import annotations

from rich.table import Table

from cfsp.plan import Plan


def summary_table(result: Plan) -> Table:
    """Per-block importance, keep fraction and width, as decided by ``prune``. When the run drops
    attention sublayers (or searched for a count), also how far each sublayer turns the residual
    stream and which were dropped; otherwise those columns would only crowd an 80-column terminal."""
    if result.kept_experts is not None:
        return expert_table(result)
    table = Table(title=f"{result.method}: per-block FFN widths", show_lines=False)
    reconstructed = {r["block"]: r for r in result.reconstruction or []}
    sublayers = result.attention_importance is not None and bool(
        result.dropped_attention or result.attention_search
    )
    dropped = set(result.dropped_attention)
    columns = (
        ("block", "importance")
        + ("attention", "mlp") * sublayers
        + ("keep", "width", "of")
        + (("reconstruction error",) * bool(reconstructed))
    )
    for column in columns:
        table.add_column(column, justify="right")
    importance = result.block_importance or [None] * len(result.widths)
    for i, (imp, keep, width, full) in enumerate(
        zip(importance, result.keep_fractions, result.widths, result.original_widths, strict=True)
    ):
        row = [str(i), "-" if imp is None else f"{imp:.4f}"]
        if sublayers:
            attention = f"{result.attention_importance[i]:.4f}" + (" dropped" if i in dropped else "")
            row += [attention, f"{result.mlp_importance[i]:.4f}"]
        row += [f"{keep:.3f}", str(width), str(full)]
        if reconstructed:
            row.append(_reconstruction_cell(reconstructed.get(i)))
        table.add_row(*row)
    return table


def expert_table(result: Plan) -> Table:
    """Per block of a mixture-of-experts model: importance, routed experts kept, and how many of
    them the calibration never routed to."""
    table = Table(title=f"{result.config.expert_metric}: routed experts per block")
    for column in ("block", "importance", "experts kept", "of", "never routed"):
        table.add_column(column, justify="right")
    importance = result.block_importance or [None] * len(result.widths)
    for i, (imp, kept, count, unrouted) in enumerate(
        zip(importance, result.kept_experts, result.original_experts, result.unrouted_experts, strict=True)
    ):
        cells = ["-", "dense", "-"] if kept is None else [str(kept.numel()), str(count), str(unrouted)]
        table.add_row(str(i), "-" if imp is None else f"{imp:.4f}", *cells)
    return table


def _reconstruction_cell(report: dict | None) -> str:
    """Relative error on the held-out windows (else the training ones): refit -> reconstructed."""
    if report is None:
        return "-"
    key = "heldout" if report["heldout_before"] is not None else "loss"
    kept = " (kept the refit)" if report["kept_refit"] else ""
    return f"{report[f'{key}_before']:.4f} -> {report[f'{key}_after']:.4f}{kept}"


def totals_table(result: Plan, cost: dict | None = None) -> Table:
    table = Table(show_header=False, box=None)
    if result.kept_experts is not None:
        table.add_row(
            "routed experts",
            f"{result.experts_after} of {result.experts_before} kept "
            f"(expert sparsity {1 - result.experts_after / result.experts_before:.3f})",
        )
        moe = next(i for i, n in enumerate(result.original_experts) if n is not None)
        if result.widths[moe] != result.original_widths[moe]:
            table.add_row("expert width", f"{result.original_widths[moe]} -> {result.widths[moe]} channels")
    else:
        table.add_row("target FFN sparsity", f"{result.target_sparsity:.3f}")
        table.add_row("realised FFN sparsity", f"{result.realised_sparsity:.3f}")
    if result.dropped_attention:
        blocks = ", ".join(map(str, result.dropped_attention))
        table.add_row("attention dropped", f"{len(result.dropped_attention)} sublayers (blocks {blocks})")
    config = result.config
    if config.attention.kv_groups:
        kept = next(len(g) for g in result.kept_kv_groups if g is not None)
        table.add_row(
            "KV groups", f"{config.attention.kv_groups} removed, {kept} kept per attention sublayer"
        )
    table.add_row("parameters before", f"{result.params_before:,}")
    table.add_row(
        "parameters after", f"{result.params_after:,} ({result.params_after / result.params_before:.3f}x)"
    )
    if result.active_params_before:
        table.add_row(
            "active parameters per token",
            f"{result.active_params_before:,} -> {result.active_params_after:,}",
        )
    if config.total_sparsity is not None:
        table.add_row(
            "total sparsity",
            f"{1 - result.params_after / result.params_before:.3f} (target {config.total_sparsity})",
        )
    if result.second_moments is not None:
        table.add_row("refit Gram matrices", result.second_moments)
    table.add_row("pruning time", f"{result.seconds:.1f} s")
    if cost is not None:
        table.add_row("peak memory (process RSS)", f"{cost['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return table
