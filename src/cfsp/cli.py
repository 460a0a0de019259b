"""The ``cfsp`` command line: thin wrappers that parse, call the API and print tables."""

from __future__ import annotations

import functools
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cfsp.compensation import DEFAULT_DAMPING
from cfsp.errors import CfspError, Terminated

app = typer.Typer(
    help="Structured FFN pruning for LLMs (CFSP and baselines), evaluation, benchmarks and recovery.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

DeviceOption = Annotated[str, typer.Option(help="auto (the first GPU if any), cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[
    str, typer.Option(help="auto (bfloat16 on a GPU, float32 on CPU), float32 or bfloat16.")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an earlier cfsp output directory.")
]


class _ConsoleHandler(logging.Handler):
    """cfsp's warnings and notes, one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        errors.print(
            f"{record.levelname.lower()}: {record.getMessage()}",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


@app.callback()
def _root() -> None:
    """Structured FFN pruning for LLMs (CFSP and baselines), evaluation, benchmarks and recovery."""
    logger = logging.getLogger("cfsp")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.setLevel(logging.INFO)


def _fail(message: str, code: int) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def friendly_errors(command):
    """Bad input: one ``error:`` line on stderr and exit code 2, never a traceback.

    Ctrl-C and SIGTERM / SIGHUP also end with one line (exit 130 / 128 + signal); the output
    reservation has already removed whatever the run had written.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CfspError as exc:
            raise _fail(str(exc), 2) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; nothing was written", 130) from None
        except Terminated as exc:
            name = signal.Signals(exc.signum).name
            raise _fail(f"stopped by {name}; nothing was written", 128 + exc.signum) from None

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


def _help(name: str) -> str:
    from cfsp.config import option_help

    return option_help(name)


@app.command()
@friendly_errors
def prune(
    out: Annotated[Path, typer.Option(help="Output directory for the pruned model.")],
    model: Annotated[
        str, typer.Option(help="Named default (smollm2, gemma3-270m), HF directory or .gguf.")
    ] = "smollm2",
    sparsity: Annotated[float, typer.Option(help=_help("sparsity"))] = 0.5,
    method: Annotated[str, typer.Option(help=_help("method"))] = "cfsp",
    calib_source: Annotated[str, typer.Option(help="wikitext2 or a .txt/.jsonl file.")] = "wikitext2",
    nsamples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the window sampling.")] = 0,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory (default: $CFSP_DATA_DIR, else the data shipped with cfsp)."),
    ] = None,
    block_metric: Annotated[str, typer.Option(help=_help("block_metric"))] = "angular",
    channel_metric: Annotated[str | None, typer.Option(help=_help("channel_metric"))] = None,
    allocation: Annotated[str | None, typer.Option(help=_help("allocation"))] = None,
    temperature: Annotated[float, typer.Option(help=_help("temperature"))] = 13.1072,
    b: Annotated[float, typer.Option(help=_help("b"))] = 1.0,
    c: Annotated[float, typer.Option(help=_help("c"))] = 1.0,
    multiple: Annotated[int | None, typer.Option(help=_help("multiple"))] = None,
    rounding: Annotated[str | None, typer.Option(help=_help("rounding"))] = None,
    compensation: Annotated[str | None, typer.Option(help=_help("compensation"))] = None,
    refit_damping: Annotated[float, typer.Option(help=_help("refit_damping"))] = DEFAULT_DAMPING,
    reference: Annotated[
        bool, typer.Option("--reference", help="The reference preset: " + _help("preset").split(": ", 1)[1])
    ] = False,
    sequential: Annotated[bool, typer.Option("--sequential", help=_help("sequential"))] = False,
    allow_inexact: Annotated[bool, typer.Option("--allow-inexact", help=_help("allow_inexact"))] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream/--no-stream",
            help="For a safetensors directory: read one block at a time (bounded memory) or load it whole.",
        ),
    ] = True,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help=_help("batch_size"))] = 8,
    offload_activations: Annotated[
        bool, typer.Option("--offload-activations", help=_help("offload_activations"))
    ] = False,
    bias_compensation: Annotated[
        bool | None, typer.Option("--bias-compensation/--no-bias-compensation", hidden=True)
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Prune a model's FFN channels and save a smaller dense model."""
    import cfsp
    from cfsp.config import PruneConfig
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


def _csv(option: str, value: str, cast=str) -> list:
    """A comma-separated option; an empty list or an item of the wrong type is one line."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise CfspError(f"--{option} is empty; give a comma-separated list, e.g. 1,4")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise CfspError(
            f"--{option} must be a comma-separated list of {cast.__name__}s, got {value!r}"
        ) from None


def _write_json(path: Path | None, payload: dict) -> None:
    from cfsp.outdir import dumps, write_text_atomic

    if path is None:
        return
    write_text_atomic(path, dumps(payload))
    console.print(f"wrote [bold]{path}[/]")


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
    out: Annotated[Path, typer.Option(help="The .gguf file to write.")],
    format: Annotated[str, typer.Option("--format", help="Output format (gguf, for llama.cpp).")] = "gguf",
    outtype: Annotated[str, typer.Option(help="Matrix storage: f32, f16, bf16 or q8_0.")] = "f16",
    tokenizer_from: Annotated[
        str | None,
        typer.Option(help="Copy the tokenizer from this .gguf (or named default) instead of tokenizer.json."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a GGUF file cfsp wrote.")] = False,
) -> None:
    """Write a model as a GGUF file that llama.cpp runs, per-block FFN widths included."""
    from cfsp.export import export_gguf

    if format != "gguf":
        raise CfspError(f"unknown --format {format!r}; gguf is the one export format")
    export_gguf(model, out, outtype, tokenizer_from=tokenizer_from, overwrite=overwrite)
    console.print(
        f"wrote [bold]{out}[/]; run it with llama.cpp, or: cfsp bench --engine llamacpp DENSE.gguf {out}"
    )


@app.command("eval")
@friendly_errors
def eval_command(
    model: Annotated[str, typer.Argument(help="Named default, HF directory, pruned directory or .gguf.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks.")] = (
        "wikitext2,boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
    ),
    limit: Annotated[int | None, typer.Option(help="Perplexity windows / examples per task.")] = None,
    seqlen: Annotated[int, typer.Option(help="Perplexity window length.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 1,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    output: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """WikiText-2 perplexity and zero-shot accuracy from the local data files."""
    import cfsp
    from cfsp.evaluation import format_results_table, plan_tasks
    from cfsp.models import resolve_device, resolve_dtype
    from cfsp.outdir import check_report_path

    names = _csv("tasks", tasks)
    plan_tasks(names, limit, seqlen, batch_size, data_dir)
    resolve_dtype(dtype, resolve_device(device))
    check_report_path(output)
    net, tokenizer = cfsp.load_model(model, dtype=dtype, device=device)
    results = cfsp.evaluate(
        net, tokenizer, tasks=names, limit=limit, seqlen=seqlen, data_dir=data_dir, batch_size=batch_size
    )
    results["meta"]["model"] = model
    console.print(format_results_table(results, title=f"Evaluation of {model}"))
    _write_json(output, results)


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
    from cfsp.bench import check_bench_settings, format_bench_table, size_on_disk
    from cfsp.models import resolve_device, resolve_dtype
    from cfsp.outdir import check_report_path

    if engine not in ("transformers", "llamacpp"):
        raise CfspError(f"unknown --engine {engine!r}; choose transformers or llamacpp")
    default_sizes = "1" if engine == "llamacpp" else "1,4"
    sizes = _csv("batch-sizes", default_sizes if batch_sizes is None else batch_sizes, int)
    lengths = _csv("prompt-lengths", prompt_lengths, int)
    check_bench_settings(sizes, lengths, decode_tokens, repeats)
    if engine == "llamacpp":
        from cfsp.bench import llamacpp_speed_benchmark

        if sizes != [1]:
            raise CfspError("llama.cpp is timed on one sequence at a time; use --batch-sizes 1")
        check_report_path(output)
        result = llamacpp_speed_benchmark(
            dense, pruned, tuple(lengths), decode_tokens=decode_tokens, repeats=repeats
        )
        for name, path in (("dense", dense), ("pruned", pruned)):
            result[f"{name}_disk_bytes"] = size_on_disk(path)
        console.print(format_bench_table(result, title="Speed in llama.cpp: pruned vs dense"))
        _write_json(output, result)
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
    _write_json(output, result)


@app.command()
@friendly_errors
def recover(
    pruned_dir: Annotated[Path, typer.Argument(help="A pruned directory written by `cfsp prune`.")],
    out: Annotated[Path, typer.Option(help="Where to save the recovered (merged) pruned model.")],
    data: Annotated[
        str,
        typer.Option(
            help="instructions (gpteacher_roleplay + dolly_hhrlhf_small), one of them, wikitext2 or a file."
        ),
    ] = "instructions",
    train: Annotated[
        str, typer.Option(help="lora (adapters, merged afterwards) or mlp (the pruned MLP weights).")
    ] = "lora",
    rank: Annotated[int, typer.Option(help="Uniform LoRA rank R; sets the trainable-parameter budget.")] = 8,
    allocation: Annotated[
        str, typer.Option(help="LoRA ranks: importance (IG-LoRA) or uniform.")
    ] = "importance",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (default: 5e-4 for lora, 1e-4 for mlp).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step and device.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 4,
    seqlen: Annotated[int, typer.Option(help="Maximum tokens per example.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    objective: Annotated[
        str, typer.Option(help="lm (next-token loss), kd (distil the dense model) or lm+kd.")
    ] = "lm",
    teacher: Annotated[
        str | None,
        typer.Option(help="The dense model for kd (default: the model the plan was pruned from)."),
    ] = None,
    kd_temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 1.0,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Trainer checkpoints (default: OUT.checkpoints).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    save_adapter: Annotated[Path | None, typer.Option(help="Also save the adapter alone here.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
    overwrite: OverwriteOption = False,
    dtype: Annotated[
        str, typer.Option(help="float32 (default: stable LoRA training) or bfloat16.")
    ] = "float32",
    device: DeviceOption = "auto",
) -> None:
    """Recover a pruned model (IG-LoRA, uniform LoRA or MLP fine-tuning; LM loss and/or distillation)."""
    import shutil

    import cfsp
    from cfsp.io import write_pruned
    from cfsp.models import resolve_device, resolve_dtype
    from cfsp.outdir import StagedOutput
    from cfsp.recovery import RecoveryConfig, resolve_recovery_source

    config = RecoveryConfig(
        rank=rank,
        allocation=allocation,
        train=train,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seqlen=seqlen,
        seed=seed,
        objective=objective,
        kd_temperature=kd_temperature,
    )
    plan = cfsp.read_plan(pruned_dir)
    if objective != "lm":
        teacher = teacher or plan.get("source_model")
        if teacher is None:
            raise CfspError(
                f"objective {objective!r} needs the dense model: pass --teacher (its plan names no source model)"
            )
    resolve_recovery_source(data, data_dir)
    resolve_dtype(dtype, resolve_device(device))
    checkpoints = (checkpoint_dir or out.with_name(out.name + ".checkpoints")).expanduser()
    fresh_checkpoints = not checkpoints.exists()
    with StagedOutput(out, overwrite, protect=[pruned_dir, checkpoints]) as folder:
        model, tokenizer = cfsp.load_pruned(pruned_dir, dtype=dtype, device=device)
        dense = cfsp.load_model(teacher, dtype=dtype, device=device)[0] if objective != "lm" else None
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
            )
        except BaseException:
            if fresh_checkpoints and checkpoints.is_dir() and not any(checkpoints.glob("checkpoint-*")):
                shutil.rmtree(checkpoints)  # this run created it and saved nothing to resume from
            raise
        trained = "MLP weights"
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
            f"{result.tokens_seen:,} tokens; final loss {result.final_loss}"
        )
        plan["recovery"] = result.summary()
        write_pruned(result.model, tokenizer, plan, folder)
    console.print(f"saved to [bold]{out}[/]")


if __name__ == "__main__":
    app()
