"""The tensors of a Hugging Face safetensors directory, read one at a time, and shards written one
at a time: the weights interface that streaming pruning and GGUF export both use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cfsp.errors import CfspError
from cfsp.models import loading_errors

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsWeights:
    """The tensors of a Hugging Face safetensors directory by name, read lazily (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CfspError(f"{index} is not a valid safetensors index ({exc})") from None
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                try:
                    with safe_open(path, "pt") as handle:
                        self.files.update(dict.fromkeys(handle.keys(), path))
                except SafetensorError as exc:
                    raise CfspError(f"cannot read {path} ({exc}): the file is truncated or corrupt") from None
        if not self.files:
            raise CfspError(
                f"{self.folder} has no safetensors weights to stream; convert it once with "
                "`cfsp convert MODEL --out DIR` or prune it with --no-stream"
            )
        self._open = safe_open

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header, without reading the tensor."""
        with loading_errors(self.files[key]), self._open(self.files[key], "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def rows(self, key: str, index: list[int]) -> torch.Tensor:
        """Rows ``index`` of a matrix, read without the rest of it (a 128k-token embedding is 1 GB
        in float32; the calibration windows use a few thousand of its rows)."""
        with loading_errors(self.files[key]), self._open(self.files[key], "pt") as handle:
            view = handle.get_slice(key)
            return torch.cat([view[i : i + 1] for i in index])

    def get(self, key: str) -> torch.Tensor:
        """A copy of one tensor. The file is mapped only for the read: a mapping held open would
        count every page read so far in the process's resident memory."""
        if key not in self.files:
            raise CfspError(
                f"{self.folder}: the weights have no tensor {key!r}; is this the model's own directory?"
            )
        with loading_errors(self.files[key]), self._open(self.files[key], "pt") as handle:
            return handle.get_tensor(key)


class ShardWriter:
    """Writes one safetensors shard per block as it is finished, then the rest and the index."""

    def __init__(self, folder: Path, shards: int) -> None:
        self.folder, self.shards, self.count = folder, shards, 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.count += 1
        name = f"model-{self.count:05d}-of-{self.shards:05d}.safetensors"
        payload = {prefix + key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        save_file(payload, self.folder / name, metadata={"format": "pt"})
        for key, value in payload.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def finish(self) -> None:
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
