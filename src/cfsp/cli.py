"""The ``cfsp`` command line: thin wrappers that parse, call the API and print tables."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cfsp.errors import CfspError

app = typer.Typer(
    help="Structured FFN pruning for LLMs (CFSP and baselines), evaluation, benchmarks and recovery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Structured FFN pruning for LLMs (CFSP and baselines), evaluation, benchmarks and recovery."""


def friendly_errors(command):
    """Turn bad input into a one-line message and exit code 2 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CfspError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


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


def totals_table(result) -> Table:
    table = Table(show_header=False, box=None)
    table.add_row("target FFN sparsity", f"{result.target_sparsity:.3f}")
    table.add_row("realised FFN sparsity", f"{result.realised_sparsity:.3f}")
    table.add_row("parameters before", f"{result.params_before:,}")
    table.add_row(
        "parameters after", f"{result.params_after:,} ({result.params_after / result.params_before:.3f}x)"
    )
    table.add_row("pruning time", f"{result.seconds:.1f} s")
    return table


@app.command()
@friendly_errors
def prune(
    out: Annotated[Path, typer.Option(help="Output directory for the pruned model.")],
    model: Annotated[str, typer.Option(help="Named default (smollm2, gemma3-270m), HF directory or .gguf.")] = "smollm2",
    sparsity: Annotated[float, typer.Option(help="Fraction of FFN channels to remove, in (0, 1).")] = 0.5,
    method: Annotated[str, typer.Option(help="cfsp, wanda-sp, flap or magnitude-sp.")] = "cfsp",
    calib_source: Annotated[str, typer.Option(help="wikitext2 or a .txt/.jsonl file.")] = "wikitext2",
    nsamples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the window sampling.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (default: $CFSP_DATA_DIR or ../shared/data).")] = None,
    block_metric: Annotated[str, typer.Option(help="angular, cosine, mse, mae or uniform.")] = "angular",
    channel_metric: Annotated[str | None, typer.Option(help="Override the method's channel metric.")] = None,
    allocation: Annotated[str | None, typer.Option(help="Override the allocation: cfsp, uniform or global.")] = None,
    temperature: Annotated[float, typer.Option(help="CFSP allocation temperature.")] = 13.1072,
    b: Annotated[float, typer.Option(help="Activation exponent inside the weight term.")] = 1.0,
    c: Annotated[float, typer.Option(help="Activation exponent of the channel score.")] = 1.0,
    multiple: Annotated[int | None, typer.Option(help="Round widths to this multiple (1 = off).")] = None,
    reference: Annotated[bool, typer.Option("--reference", help="Use the reference implementation's numerics.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16.")] = "float32",
    batch_size: Annotated[int, typer.Option(help="Windows per forward batch during calibration.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
) -> None:
    """Prune a model's FFN channels and save a smaller dense model."""
    import cfsp
    from cfsp.data import describe_windows
    from cfsp.io import check_output_dir
    from cfsp.methods import get_method, needs_calibration

    check_output_dir(out, overwrite)
    if not 0.0 < sparsity < 1.0:
        raise CfspError(f"sparsity must be in (0, 1), got {sparsity}; e.g. 0.5 removes half the FFN channels")
    spec = get_method(method)
    console.print(f"loading [bold]{model}[/] ...")
    net, tokenizer = cfsp.load_model(model, dtype=dtype)
    calib = calibration = None
    if needs_calibration(channel_metric or spec.channel_metric, allocation or spec.allocation):
        calib = cfsp.calibration_windows(
            tokenizer, source=calib_source, n=nsamples, length=seqlen, seed=seed, data_dir=data_dir
        )
        calibration = describe_windows(calib_source, nsamples, seqlen, seed)
    result = cfsp.prune(
        net,
        calib,
        sparsity,
        method=method,
        block_metric=block_metric,
        channel_metric=channel_metric,
        allocation=allocation,
        temperature=temperature,
        b=b,
        c=c,
        multiple=multiple,
        reference=reference,
        batch_size=batch_size,
        calibration=calibration,
    )
    console.print(summary_table(result))
    console.print(totals_table(result))
    cfsp.save_pruned(net, tokenizer, result, out, overwrite=overwrite)
    console.print(f"saved to [bold]{out}[/]")
