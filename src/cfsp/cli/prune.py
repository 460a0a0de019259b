"""``cfsp prune``: prune a model and save the pruned directory."""

from __future__ import annotations

from dataclasses import fields
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
    option_help,
)
from cfsp.cli.tables import summary_table, totals_table
from cfsp.config import PruneConfig
from cfsp.errors import CfspError

# The flags' defaults are PruneConfig's own.
DEFAULTS = {f.name: f.default for f in fields(PruneConfig)}


@app.command()
@friendly_errors
def prune(
    out: Annotated[Path, typer.Option(help="Output directory for the pruned model.")],
    model: Annotated[
        str, typer.Option(help="Named default (smollm2, gemma3-270m), HF directory or .gguf.")
    ] = "smollm2",
    sparsity: Annotated[float, typer.Option(help=option_help("sparsity"))] = DEFAULTS["sparsity"],
    method: Annotated[str, typer.Option(help=option_help("method"))] = DEFAULTS["method"],
    calib_source: Annotated[str, typer.Option(help="wikitext2 or a .txt/.jsonl file.")] = "wikitext2",
    nsamples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the window sampling.")] = 0,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory (default: $CFSP_DATA_DIR, else the data shipped with cfsp)."),
    ] = None,
    block_metric: Annotated[str, typer.Option(help=option_help("block_metric"))] = DEFAULTS["block_metric"],
    channel_metric: Annotated[str | None, typer.Option(help=option_help("channel_metric"))] = None,
    allocation: Annotated[str | None, typer.Option(help=option_help("allocation"))] = None,
    temperature: Annotated[float, typer.Option(help=option_help("temperature"))] = DEFAULTS["temperature"],
    b: Annotated[float, typer.Option(help=option_help("b"))] = DEFAULTS["b"],
    c: Annotated[float, typer.Option(help=option_help("c"))] = DEFAULTS["c"],
    multiple: Annotated[int | None, typer.Option(help=option_help("multiple"))] = None,
    rounding: Annotated[str | None, typer.Option(help=option_help("rounding"))] = None,
    compensation: Annotated[str | None, typer.Option(help=option_help("compensation"))] = None,
    refit_damping: Annotated[float, typer.Option(help=option_help("refit_damping"))] = DEFAULTS[
        "refit_damping"
    ],
    reconstruct_epochs: Annotated[int, typer.Option(help=option_help("reconstruct_epochs"))] = DEFAULTS[
        "reconstruct_epochs"
    ],
    reconstruct_lr: Annotated[float, typer.Option(help=option_help("reconstruct_lr"))] = DEFAULTS[
        "reconstruct_lr"
    ],
    reconstruct_batch_tokens: Annotated[
        int, typer.Option(help=option_help("reconstruct_batch_tokens"))
    ] = DEFAULTS["reconstruct_batch_tokens"],
    reconstruct_target: Annotated[str, typer.Option(help=option_help("reconstruct_target"))] = DEFAULTS[
        "reconstruct_target"
    ],
    reconstruct_inputs: Annotated[str, typer.Option(help=option_help("reconstruct_inputs"))] = DEFAULTS[
        "reconstruct_inputs"
    ],
    reconstruct_holdout: Annotated[float, typer.Option(help=option_help("reconstruct_holdout"))] = DEFAULTS[
        "reconstruct_holdout"
    ],
    reconstruct_schedule: Annotated[str, typer.Option(help=option_help("reconstruct_schedule"))] = DEFAULTS[
        "reconstruct_schedule"
    ],
    reference: Annotated[
        bool,
        typer.Option("--reference", help="The reference preset: " + option_help("preset").split(": ", 1)[1]),
    ] = False,
    uniform: Annotated[bool, typer.Option("--uniform", help=option_help("uniform"))] = False,
    drop_attention: Annotated[str, typer.Option(help=option_help("drop_attention"))] = "0",
    kv_groups: Annotated[int, typer.Option(help=option_help("kv_groups"))] = 0,
    kv_group_metric: Annotated[str, typer.Option(help=option_help("kv_group_metric"))] = "refit",
    total_sparsity: Annotated[float | None, typer.Option(help=option_help("total_sparsity"))] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help=option_help("sequential"))] = False,
    allow_inexact: Annotated[
        bool, typer.Option("--allow-inexact", help=option_help("allow_inexact"))
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
    batch_size: Annotated[int, typer.Option(help=option_help("batch_size"))] = DEFAULTS["batch_size"],
    offload_activations: Annotated[
        bool, typer.Option("--offload-activations", help=option_help("offload_activations"))
    ] = False,
    bias_compensation: Annotated[
        bool | None, typer.Option("--bias-compensation/--no-bias-compensation", hidden=True)
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Prune a model's FFN channels and save a smaller dense model."""
    import cfsp
    from cfsp.data import check_windows, describe_windows, text_source_path
    from cfsp.io import write_pruned
    from cfsp.memory import pruning_cost
    from cfsp.models import load_tokenizer, resolve_device, resolve_dtype
    from cfsp.outdir import StagedOutput
    from cfsp.streaming import check_streamable, is_streamable, stream_into

    if bias_compensation is not None:
        raise CfspError("--bias-compensation is gone; use --compensation mean (or none)")
    config = PruneConfig(
        sparsity=sparsity,
        method=method,
        preset="reference" if reference else "default",
        block_metric=block_metric,
        channel_metric=channel_metric,
        allocation=allocation,
        temperature=temperature,
        b=b,
        c=c,
        multiple=multiple,
        rounding=rounding,
        compensation=compensation,
        refit_damping=refit_damping,
        reconstruct_epochs=reconstruct_epochs,
        reconstruct_lr=reconstruct_lr,
        reconstruct_batch_tokens=reconstruct_batch_tokens,
        reconstruct_target=reconstruct_target,
        reconstruct_inputs=reconstruct_inputs,
        reconstruct_holdout=reconstruct_holdout,
        reconstruct_schedule=reconstruct_schedule,
        uniform=uniform,
        drop_attention=_count_or_word(drop_attention),
        kv_groups=kv_groups,
        kv_group_metric=kv_group_metric,
        total_sparsity=total_sparsity,
        sequential=sequential,
        allow_inexact=allow_inexact,
        batch_size=batch_size,
        offload_activations=offload_activations,
    )
    resolve_dtype(dtype, resolve_device(device))
    if config.needs_calibration:
        check_windows(nsamples, seqlen)
        text_source_path(calib_source, data_dir)
    streamed = stream and is_streamable(model)
    if streamed:
        check_streamable(Path(model))
        if config.drop_attention == "auto":
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
    if config.uniform:
        console.print(
            f"every block keeps {result.widths[0]} channels (FFN sparsity {result.realised_sparsity:.3f}): "
            "a stock checkpoint, loads with AutoModelForCausalLM.from_pretrained without trust_remote_code"
        )


def _count_or_word(value: str) -> float | str:
    """A number where the flag holds one (2, 0.1), else the word itself (auto), which the config checks."""
    try:
        return float(value)
    except ValueError:
        return value
