"""``cfsp recover``: fine-tune a pruned model back towards its dense quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cfsp.cli.app import (
    DeviceOption,
    OverwriteOption,
    app,
    console,
    friendly_errors,
)
from cfsp.cli.options import with_config_options
from cfsp.errors import CfspError
from cfsp.recovery.config import RecoveryConfig


@app.command()
@friendly_errors
@with_config_options(RecoveryConfig)
def recover(
    pruned_dir: Annotated[Path, typer.Argument(help="A pruned directory written by `cfsp prune`.")],
    out: Annotated[Path, typer.Option(help="Where to save the recovered (merged) pruned model.")],
    data: Annotated[
        str,
        typer.Option(
            help="instructions (gpteacher_roleplay + dolly_hhrlhf_small), one of them, wikitext2, a file, or a "
            "folder of .jsonl/.txt/.parquet shards or a saved datasets directory (streamed)."
        ),
    ] = "instructions",
    teacher: Annotated[
        str | None,
        typer.Option(help="The dense model for kd (default: the model the plan was pruned from)."),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints (default: OUT.checkpoints); every process must see it.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    save_adapter: Annotated[Path | None, typer.Option(help="Also save the adapter alone here.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    overwrite: OverwriteOption = False,
    dtype: Annotated[
        str, typer.Option(help="float32 (default: stable LoRA training) or bfloat16.")
    ] = "float32",
    device: DeviceOption = "auto",
    options: dict | None = None,
) -> None:
    """Recover a pruned model (IG-LoRA, uniform LoRA, MLP or block fine-tuning; LM loss and/or
    distillation). Under `torchrun --nproc-per-node N -m cfsp recover ...` it runs on N processes
    (DDP, or FSDP with --fsdp); rank 0 alone prints and writes."""
    import shutil
    from contextlib import ExitStack

    import cfsp
    from cfsp.models import resolve_device, resolve_dtype
    from cfsp.outdir import StagedOutput
    from cfsp.recovery import resolve_recovery_source
    from cfsp.recovery.distributed import Cluster
    from cfsp.saving import write_pruned

    config = RecoveryConfig(**options)
    objective, train, rank, allocation = config.objective, config.train, config.rank, config.allocation
    plan = cfsp.read_plan(pruned_dir)
    if objective != "lm":
        teacher = teacher or plan.get("source_model")
        if teacher is None:
            raise CfspError(
                f"objective {objective!r} needs the dense model: pass --teacher (its plan names no source model)"
            )
    if not Path(data).expanduser().is_dir():
        resolve_recovery_source(data, data_dir)
    resolve_dtype(dtype, resolve_device(device))
    checkpoints = (checkpoint_dir or out.with_name(out.name + ".checkpoints")).expanduser()
    fresh_checkpoints = not checkpoints.exists()
    cluster = Cluster.start(resolve_device(device))
    # One reservation per job, not per process: rank 0 holds the output, the others never write.
    with ExitStack() as stack:
        stack.callback(cluster.close)
        folder, error = None, None
        if cluster.main:
            try:
                folder = stack.enter_context(StagedOutput(out, overwrite, protect=[pruned_dir, checkpoints]))
            except CfspError as exc:
                error = exc
        cluster.agree(error)
        where = "cpu" if cluster.distributed else device  # recovery moves each process's copy to its device
        model, tokenizer = cfsp.load_pruned(pruned_dir, dtype=dtype, device=where)
        dense = cfsp.load_model(teacher, dtype=dtype, device=where)[0] if objective != "lm" else None
        if tokenizer is None:
            raise CfspError(
                f"{pruned_dir} has no tokenizer, which recovery needs; save it with its tokenizer"
            )
        try:
            result = cfsp.recover(
                model,
                tokenizer,
                data,
                plan.get("block_importance"),
                config,
                output_dir=checkpoints,
                resume=resume,
                save_adapter=save_adapter,
                data_root=data_dir,
                teacher=dense,
                cluster=cluster,
            )
        except BaseException:
            if (
                cluster.main
                and fresh_checkpoints
                and checkpoints.is_dir()
                and not any(checkpoints.glob("checkpoint-*"))
            ):
                shutil.rmtree(checkpoints)  # this run created it and saved nothing to resume from
            raise
        if not cluster.main:
            return
        trained = {"mlp": "MLP weights", "all": "every block weight"}.get(train, "")
        if train == "lora":
            table = Table(title="LoRA ranks per block")
            table.add_column("block", justify="right")
            table.add_column("rank", justify="right")
            for i, r in enumerate(result.ranks):
                table.add_row(str(i), str(r))
            console.print(table)
            trained = f"{allocation}; uniform rank {rank}: {result.uniform_params:,}"
        console.print(
            f"trainable parameters: {result.trainable_params:,} ({trained}); "
            f"{result.tokens_seen:,} tokens on {result.processes} process(es); final loss {result.final_loss}"
        )
        plan["recovery"] = result.summary()
        write_pruned(result.model, tokenizer, plan, folder)
    console.print(f"saved to [bold]{out}[/]")
