"""``cfsp convert`` and ``cfsp export``: a model into safetensors or GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cfsp.cli.app import (
    app,
    console,
    friendly_errors,
)
from cfsp.errors import CfspError


@app.command()
@friendly_errors
def convert(
    model: Annotated[str, typer.Argument(help="Named default, .gguf file or HF directory.")],
    out: Annotated[Path, typer.Option(help="Where to write the safetensors directory.")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Write a model as a plain safetensors directory, once, so that `cfsp prune` can stream it."""
    import torch

    import cfsp
    from cfsp.models import resolve_dtype
    from cfsp.outdir import StagedOutput

    resolve_dtype(dtype, torch.device("cpu"))
    with StagedOutput(out, protect=[model]) as folder:
        net, tokenizer = cfsp.load_model(model, dtype=dtype, device="cpu")
        net.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    console.print(f"wrote [bold]{out}[/]; prune it with: cfsp prune --model {out} --out ...")


@app.command()
@friendly_errors
def export(
    model: Annotated[str, typer.Argument(help="Pruned directory, HF directory, named default or .gguf.")],
    out: Annotated[Path, typer.Option(help="The .gguf file (or, with --format vllm, directory) to write.")],
    format: Annotated[
        str,
        typer.Option("--format", help="gguf (llama.cpp, ollama, LM Studio) or vllm (a DeciLM directory)."),
    ] = "gguf",
    outtype: Annotated[
        str,
        typer.Option(
            help="Matrix storage: f32, f16, bf16, q8_0, or a llama.cpp quantization (q4_k_m, q5_k_m, q6_k, "
            "q4_0, ...) done by llama.cpp's own quantizer."
        ),
    ] = "f16",
    tokenizer_from: Annotated[
        str | None,
        typer.Option(help="Copy the tokenizer from this .gguf (or named default) instead of tokenizer.json."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an output cfsp wrote.")] = False,
) -> None:
    """Write a model for an inference engine, per-block FFN widths included: a GGUF file for
    llama.cpp, or a DeciLM directory for vLLM."""
    from cfsp.export import export_gguf

    if format not in ("gguf", "vllm"):
        raise CfspError(f"unknown --format {format!r}; choose gguf (llama.cpp) or vllm")
    if format == "vllm":
        from cfsp.export.vllm import export_vllm

        export_vllm(model, out, overwrite=overwrite)
        console.print(f"wrote [bold]{out}[/]; serve it with: vllm serve {out} --trust-remote-code")
        return
    export_gguf(model, out, outtype, tokenizer_from=tokenizer_from, overwrite=overwrite)
    console.print(
        f"wrote [bold]{out}[/]; run it with llama.cpp, or: cfsp bench --engine llamacpp DENSE.gguf {out}"
    )
