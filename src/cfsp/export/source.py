"""What an export reads: a pruned or Hugging Face directory streamed tensor by tensor, or a
named default / GGUF loaded whole, and where its tokenizer comes from."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cfsp.errors import CfspError
from cfsp.export.deci import check_exportable
from cfsp.export.encoding import gguf_module
from cfsp.outdir import PLAN_FILE

log = logging.getLogger("cfsp")


# --------------------------------------------------------------------------- where tensors come from


class StateDictWeights:
    """An in-memory model's tensors behind the interface of ``weights.SafetensorsWeights``."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


@dataclass
class ExportSource:
    """What an export reads: a config, tensors by Hugging Face name, and where the tokenizer is."""

    config: dict
    weights: object  # SafetensorsWeights or StateDictWeights
    tokenizer_dir: Path | None  # a directory with tokenizer.json (and tokenizer_config.json)
    tokenizer_gguf: Path | None  # a GGUF whose tokenizer metadata is copied as is
    name: str


def open_source(model: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None) -> ExportSource:
    """A pruned or Hugging Face directory (streamed), or a named default / ``.gguf`` (loaded)."""
    from cfsp.models import NAMED_MODELS, resolve_gguf

    name = str(model)
    path = Path(name).expanduser()
    gguf_tokenizer = _tokenizer_gguf(tokenizer_from) if tokenizer_from is not None else None
    if name in NAMED_MODELS or (path.is_file() and path.suffix == ".gguf"):
        from cfsp.models import load_model

        source_gguf = resolve_gguf(name) if name in NAMED_MODELS else path.resolve()
        _check_gguf_architecture(source_gguf)  # before the minutes a large GGUF takes to load
        loaded, _ = load_model(name, dtype="float32", device="cpu")
        return ExportSource(
            config=loaded.config.to_dict(),
            weights=StateDictWeights(loaded.state_dict()),
            tokenizer_dir=None,
            tokenizer_gguf=gguf_tokenizer or source_gguf,
            name=path.stem if path.suffix == ".gguf" else name,
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        known = ", ".join(NAMED_MODELS)
        raise CfspError(
            f"model {name!r} is not a named default ({known}), a .gguf file or a model directory with config.json"
        )
    from cfsp.weights import SafetensorsWeights

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if gguf_tokenizer is None:
        gguf_tokenizer = _recorded_source_gguf(path)
    return ExportSource(
        config=config,
        weights=SafetensorsWeights(path),
        tokenizer_dir=path if (path / "tokenizer.json").is_file() else None,
        tokenizer_gguf=gguf_tokenizer,
        name=path.resolve().name,
    )


def _check_gguf_architecture(path: Path) -> None:
    """A GGUF source of an architecture the export refuses fails before it is de-quantized."""
    field = gguf_module().GGUFReader(path).fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ("llama", "qwen2"):  # GGUF writes Mistral models as llama
        check_exportable({"model_type": arch})


def _tokenizer_gguf(value: str | os.PathLike) -> Path:
    from cfsp.models import NAMED_MODELS, resolve_gguf

    if str(value) in NAMED_MODELS:
        return resolve_gguf(str(value))
    path = Path(value).expanduser()
    if not path.is_file() or path.suffix != ".gguf":
        raise CfspError(
            f"--tokenizer-from {value}: give a .gguf file or a named default ({', '.join(NAMED_MODELS)})"
        )
    return path.resolve()


def _recorded_source_gguf(folder: Path) -> Path | None:
    """The GGUF a pruned directory was made from, when its plan names one that is still there."""
    from cfsp.models import NAMED_MODELS, resolve_gguf

    try:
        source = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8")).get("source_model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(source, str):
        return None
    if source in NAMED_MODELS:
        try:
            return resolve_gguf(source)
        except CfspError:
            return None
    path = Path(source)
    return path if path.suffix == ".gguf" and path.is_file() else None
