"""``cfsp prune``: prune a model and save the pruned directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cfsp.cli.app import (
    DeviceOption,
    DtypeOption,
    OverwriteOption,
    app,
    console,
    friendly_errors,
)
from cfsp.cli.options import count_or_word, with_config_options
from cfsp.cli.tables import summary_table, totals_table
from cfsp.config import PruneConfig
from cfsp.errors import CfspError


@app.command()
@friendly_errors
@with_config_options(PruneConfig, skip=("preset",))
def prune(
    out: Annotated[Path, typer.Option(help="Output directory for the pruned model.")],
    model: Annotated[
        str, typer.Option(help="Named default (smollm2, gemma3-270m), HF directory or .gguf.")
    ] = "smollm2",
    calib_source: Annotated[str, typer.Option(help="wikitext2 or a .txt/.jsonl file.")] = "wikitext2",
    nsamples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the window sampling.")] = 0,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory (default: $CFSP_DATA_DIR, else the data shipped with cfsp)."),
    ] = None,
    reference: Annotated[
        bool,
        typer.Option("--reference", help="The reference preset: the reference implementation's numerics."),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream/--no-stream",
            help="For a safetensors directory: read one block at a time (bounded memory) or load it whole.",
        ),
    ] = True,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    bias_compensation: Annotated[
        bool | None, typer.Option("--bias-compensation/--no-bias-compensation", hidden=True)
    ] = None,
    overwrite: OverwriteOption = False,
    options: dict | None = None,
) -> None:
    """Prune a model's FFN channels (or a mixture-of-experts model's routed experts) and save it."""
    import cfsp
    from cfsp.data import check_windows, describe_windows, text_source_path
    from cfsp.memory import pruning_cost
    from cfsp.models import load_tokenizer, resolve_device, resolve_dtype
    from cfsp.outdir import StagedOutput
    from cfsp.saving import write_pruned
    from cfsp.streaming import check_streamable, is_streamable, load_whole, stream_into

    if bias_compensation is not None:
        raise CfspError("--bias-compensation is gone; use --compensation mean (or none)")
    options["drop_attention"] = count_or_word(options["drop_attention"])
    config = PruneConfig.from_options(preset="reference" if reference else "default", **options)
    resolve_dtype(dtype, resolve_device(device))
    if config.needs_calibration:
        check_windows(nsamples, seqlen)
        text_source_path(calib_source, data_dir)
    streamed = stream and is_streamable(model)
    if streamed:
        check_streamable(Path(model))
        if config.attention.drop_attention == "auto":
            raise CfspError(
                "--drop-attention auto prunes copies of the model in memory, which streaming avoids: add "
                "--no-stream, or give a count"
            )
    with StagedOutput(out, overwrite, protect=[model]) as folder:
        if streamed:
            console.print(f"streaming [bold]{model}[/] block by block ...")
            net, tokenizer = None, load_tokenizer(model)
        else:
            console.print(f"loading [bold]{model}[/] ...")
            if is_streamable(model):  # each tensor its own storage: what pruning removes is freed
                net, tokenizer = load_whole(model, device=device, dtype=dtype), load_tokenizer(model)
            else:
                net, tokenizer = cfsp.load_model(model, dtype=dtype, device=device)
        calib = calibration = None
        if config.needs_calibration:
            calib = cfsp.calibration_windows(
                tokenizer, source=calib_source, n=nsamples, length=seqlen, seed=seed, data_dir=data_dir
            )
            calibration = describe_windows(calib_source, nsamples, seqlen, seed)
        if streamed:
            result, cost = pruning_cost(
                stream_into,
                Path(model),
                calib,
                config,
                folder,
                device=device,
                dtype=dtype,
                calibration=calibration,
            )
        else:
            result, cost = pruning_cost(cfsp.prune, net, calib, config, calibration=calibration)
        console.print(summary_table(result))
        console.print(totals_table(result, cost))
        if not streamed:
            write_pruned(net, tokenizer, result, folder)
    console.print(f"saved to [bold]{out}[/]")
    if result.kept_experts is not None:
        console.print(
            f"every mixture-of-experts block keeps {result.experts_after // max(1, sum(k is not None for k in result.kept_experts))} "
            "routed experts: a stock checkpoint, loads with AutoModelForCausalLM.from_pretrained"
        )
    elif config.uniform:
        console.print(
            f"every block keeps {result.widths[0]} channels (FFN sparsity {result.realised_sparsity:.3f}): "
            "a stock checkpoint, loads with AutoModelForCausalLM.from_pretrained without trust_remote_code"
        )
