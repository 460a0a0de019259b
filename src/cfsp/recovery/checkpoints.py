"""Resumable recovery checkpoints, written with PyTorch's distributed checkpoint (DCP).

``checkpoint-N/`` holds what training changes: the trained weights (adapters, or the trained block
weights) and the optimizer state, as DCP shards (each process writes its own part, so every
process must see the same folder), plus ``cfsp_state.json`` from rank 0: the step, the tokens
seen, the loss history, the global batch and the LoRA ranks. DCP stores tensors by name and
global shape, not by process, so a checkpoint written by 8 FSDP processes loads into 2, or into
one plain process, and the other way round. A folder appears under its final name only when
every process has written its part (staged as ``.checkpoint-N.tmp``, then renamed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from cfsp.errors import CfspError
from cfsp.recovery.distributed import Cluster

_NO_GROUP = "torch.distributed is disabled, unavailable or uninitialized"  # DCP's note on one process

STATE_FILE = "cfsp_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_in(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resume_checkpoint(output_dir: str | os.PathLike, resume: bool | str | os.PathLike) -> str | None:
    """The checkpoint to resume from: ``True`` -> latest ``checkpoint-N`` in ``output_dir``; a path -> it.

    Refuses to start fresh over existing checkpoints, which a later resume would mix up.
    """
    out = Path(output_dir)
    found = checkpoints_in(out)
    latest = str(found[-1][1]) if found else None
    if resume is False:
        if latest is not None:
            raise CfspError(
                f"{out} already holds checkpoints ({Path(latest).name}); pass --resume to continue "
                "or choose another output directory"
            )
        return None
    if resume is True:
        if latest is None:
            raise CfspError(f"no checkpoint-N folder in {out} to resume from; run without --resume first")
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CfspError(f"checkpoint {path} does not exist; pass --resume alone for the latest one")
    return str(path)


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))


def lora_record(lora_config) -> dict[str, Any] | None:
    """What a resumed run must match: the adapter's ranks."""
    if lora_config is None:
        return None
    return {"r": lora_config.r, "rank_pattern": dict(lora_config.rank_pattern)}


def check_checkpoint_ranks(checkpoint: str | os.PathLike, lora_config) -> None:
    """Fail with one line when a checkpoint's adapter has other ranks than this run would build."""
    saved = read_state(checkpoint).get("lora")
    if saved is not None and saved != lora_record(lora_config):
        raise CfspError(
            f"checkpoint {checkpoint} was trained with other LoRA ranks than this run; resume with the same "
            "rank, allocation and block importances, or start a fresh output directory"
        )


def _state_dicts(wrapped: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(wrapped, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_checkpoint(
    folder: Path,
    step: int,
    wrapped: nn.Module,
    optimizer,
    state: dict[str, Any],
    cluster: Cluster,
    keep: int | None,
) -> Path:
    """Write ``checkpoint-step`` (all processes take part) and drop all but the ``keep`` newest."""
    import torch.distributed.checkpoint as dcp

    final = folder / f"checkpoint-{step}"
    staging = folder / f".checkpoint-{step}.tmp"
    if cluster.main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run at this very step
        staging.mkdir()
    try:
        cluster.barrier()
        model_state, optim_state = _state_dicts(wrapped, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_GROUP)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging))
        cluster.barrier()
        if cluster.main:
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            if final.exists():  # the same step saved by an earlier run that was resumed from before it
                shutil.rmtree(final)
            staging.rename(final)
    except BaseException:
        if cluster.main:  # a process died or a signal came mid-save: no half-written checkpoint stays
            shutil.rmtree(staging, ignore_errors=True)
        raise
        if keep is not None:
            for _, old in checkpoints_in(folder)[:-keep]:
                shutil.rmtree(old)
    cluster.barrier()
    return final


def load_checkpoint(checkpoint: str | os.PathLike, wrapped: nn.Module, optimizer) -> dict[str, Any]:
    """Load the trained weights and optimizer state into this run (any process count); return the state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optim_state = _state_dicts(wrapped, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_GROUP)
        dcp.load(loaded, checkpoint_id=str(checkpoint))
    set_state_dict(
        wrapped,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    return read_state(checkpoint)
