"""``cfsp eval``: perplexity and zero-shot accuracy."""

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

    names = parse_csv("tasks", tasks)
    plan_tasks(names, limit, seqlen, batch_size, data_dir)
    resolve_dtype(dtype, resolve_device(device))
    check_report_path(output)
    net, tokenizer = cfsp.load_model(model, dtype=dtype, device=device)
    results = cfsp.evaluate(
        net, tokenizer, tasks=names, limit=limit, seqlen=seqlen, data_dir=data_dir, batch_size=batch_size
    )
    results["meta"]["model"] = model
    console.print(format_results_table(results, title=f"Evaluation of {model}"))
    write_json(output, results)
