"""``cfsp bench``: speed, dense vs pruned."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cfsp.cli.app import (
    DeviceOption,
    DtypeOption,
    app,
    console,
    friendly_errors,
    parse_csv,
    write_json,
)
from cfsp.errors import CfspError


@app.command()
@friendly_errors
def bench(
    dense: Annotated[str, typer.Argument(help="The dense model (named default, directory or .gguf).")],
    pruned: Annotated[str, typer.Argument(help="The pruned directory (a .gguf with --engine llamacpp).")],
    engine: Annotated[
        str, typer.Option(help="transformers, or llamacpp for two .gguf files.")
    ] = "transformers",
    batch_sizes: Annotated[
        str | None, typer.Option(help="Comma-separated batch sizes (default 1,4; llama.cpp: 1).")
    ] = None,
    prompt_lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = "128,512",
    decode_tokens: Annotated[int, typer.Option(help="Tokens generated per decode measurement.")] = 32,
    repeats: Annotated[int, typer.Option(help="Measurements per model and setting (median).")] = 3,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """Prefill / decode throughput of a pruned model against its dense original, side by side."""
    import cfsp
    from cfsp.models import resolve_device, resolve_dtype
    from cfsp.outdir import check_report_path
    from cfsp.speed import check_bench_settings, format_bench_table, size_on_disk

    if engine not in ("transformers", "llamacpp"):
        raise CfspError(f"unknown --engine {engine!r}; choose transformers or llamacpp")
    default_sizes = "1" if engine == "llamacpp" else "1,4"
    sizes = parse_csv("batch-sizes", default_sizes if batch_sizes is None else batch_sizes, int)
    lengths = parse_csv("prompt-lengths", prompt_lengths, int)
    check_bench_settings(sizes, lengths, decode_tokens, repeats)
    if engine == "llamacpp":
        from cfsp.speed import llamacpp_speed_benchmark

        if sizes != [1]:
            raise CfspError("llama.cpp is timed on one sequence at a time; use --batch-sizes 1")
        check_report_path(output)
        result = llamacpp_speed_benchmark(
            dense, pruned, tuple(lengths), decode_tokens=decode_tokens, repeats=repeats
        )
        for name, path in (("dense", dense), ("pruned", pruned)):
            result[f"{name}_disk_bytes"] = size_on_disk(path)
        console.print(format_bench_table(result, title="Speed in llama.cpp: pruned vs dense"))
        write_json(output, result)
        return
    resolve_dtype(dtype, resolve_device(device))
    check_report_path(output)
    dense_model, tokenizer = cfsp.load_model(dense, dtype=dtype, device=device)
    pruned_model, _ = cfsp.load_model(pruned, dtype=dtype, device=device)
    result = cfsp.speed_benchmark(
        dense_model,
        pruned_model,
        tokenizer,
        batch_sizes=tuple(sizes),
        prompt_lengths=tuple(lengths),
        decode_tokens=decode_tokens,
        repeats=repeats,
    )
    for name, path in (("dense", dense), ("pruned", pruned)):
        result[f"{name}_disk_bytes"] = size_on_disk(path) if Path(path).is_dir() else None
    console.print(format_bench_table(result))
    write_json(output, result)
