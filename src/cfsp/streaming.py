"""Pruning a model that does not fit in memory: block weights are streamed from safetensors.

The model is built on the meta device with only the small tensors outside the blocks (norm,
rotary tables) loaded; the embeddings are loaded just to compute block 0's inputs and the LM head
never. The one calibration pass then onloads each block's weights from the safetensors files onto
the execution device, runs it, records its statistics and channel scores, and frees it. After
allocation, the surgery pass onloads each block again, slices it, writes its tensors to their own
output shard and frees it (with the refit, or ``sequential``, that pass is a second calibration
pass, so each block's Gram matrix exists only while the block is refit). Peak memory is one block
+ the calibration activations (+ the embedding during the capture), whatever the model's depth.

The output is an ordinary pruned directory (sharded safetensors + index, config, modeling file,
plan, tokenizer), written through an output reservation like every other cfsp output. Tensors are
read and written in the checkpoint's own form: a mixture-of-experts checkpoint that keeps one
tensor per routed expert (``experts.3.gate_proj.weight``) is stacked into the model's expert
tensors on the way in and split again on the way out (``cfsp.experts.stored_tensor``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from cfsp.calibration import InMemoryBlocks
from cfsp.config import PruneConfig
from cfsp.errors import CfspError
from cfsp.experts import StoredTensor, stored_tensor
from cfsp.models import decoder_blocks, load_tokenizer, loading_errors, resolve_device, resolve_dtype
from cfsp.outdir import StagedOutput
from cfsp.pruning import PruneResult, prune
from cfsp.weights import SafetensorsWeights, ShardWriter


def _set(module: nn.Module, name: str, device: torch.device | str, value: torch.Tensor | None = None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value)


def _load(
    module: nn.Module, name: str, weights: SafetensorsWeights, key: str | StoredTensor, device, dtype
) -> None:
    """Put tensor ``key`` of the files (or the per-expert tensors it is stored as, stacked) into
    ``module.<name>``, which must have its shape."""
    if isinstance(key, StoredTensor) and key.key is None:
        experts = [torch.cat([weights.get(k) for k in key.expert_keys(e)], dim=0) for e in range(key.count)]
        value, key = torch.stack(experts), f"{key.base}.*"
    else:
        key = key.key if isinstance(key, StoredTensor) else key
        value = weights.get(key)
    is_parameter = name in dict(module.named_parameters())
    expected = (module.get_parameter(name) if is_parameter else module.get_buffer(name)).shape
    if value.shape != expected:
        raise CfspError(
            f"cannot load the model in {weights.folder}: its weights do not match the shapes in "
            f"config.json ({key}: {tuple(value.shape)} in the files, {tuple(expected)} from the config)"
        )
    _set(module, name, device, _as(value, dtype))


class StreamedBlocks(InMemoryBlocks):
    """Block weights live in safetensors files: onload reads them, offload frees (or writes) them."""

    def __init__(
        self, model: nn.Module, weights: SafetensorsWeights, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model, self.weights, self.device, self.dtype = model, weights, device, dtype
        layers = decoder_blocks(model)
        self.prefix = next(name for name, module in model.named_modules() if module is layers)
        self.writer: ShardWriter | None = None
        self.writing = False
        self.streams = True
        self._stored: dict[int, dict[str, StoredTensor | None]] = {}

    def block(self, index: int) -> nn.Module:
        return decoder_blocks(self.model)[index]

    def onload(self, index: int) -> None:
        block = self.block(index)
        for name, stored in self.stored_tensors(index).items():
            _load(block, name, self.weights, stored, self.device, self.dtype)

    def offload(self, index: int) -> None:
        block = self.block(index)
        stored = self.stored_tensors(index)
        if self.writing and self.writer is not None:  # under the checkpoint's own names and form
            tensors = {}
            for name, value in block.state_dict().items():
                form = stored.get(name)
                if form is not None and form.key is None:
                    tensors.update(form.split(value))
                else:
                    tensors[form.key if form is not None else f"{self.prefix}.{index}.{name}"] = value
            self.writer.write("", tensors)
        for name in stored:
            _set(block, name, "meta")

    def begin_output(self) -> None:
        self.writing = True

    def stored_tensors(self, index: int) -> dict[str, StoredTensor]:
        """What block ``index`` reads from the files, and where: its parameters, and its buffers
        that the checkpoint holds (Gemma 4's ``layer_scalar`` and DeepSeek's
        ``e_score_correction_bias`` are; rotary tables are not and keep their computed values)."""
        block, prefix = self.block(index), f"{self.prefix}.{index}."
        known = self._stored.setdefault(index, {})  # the lookups, not the names: surgery changes those
        found = {}
        for name, _ in [*block.named_parameters(), *block.named_buffers()]:
            if name not in known:
                known[name] = stored_tensor(prefix, name, self.weights.files)
            if known[name] is not None:
                found[name] = known[name]
        return found

    def before_capture(self, windows: torch.Tensor) -> torch.Tensor:
        """Load only the rows the windows use of every token-indexed table, and renumber the windows
        to match.

        The tables (the embeddings, and Gemma 4's per-layer embeddings) are needed only to compute
        block 0's inputs, and those depend on a token's row alone (positions and masks come from the
        shape), so compact tables give the same inputs at a fraction of the memory. A padding row
        (``padding_idx``, e.g. Qwen's pad id 151643) may lie outside the compact table: it only
        matters for gradients, so it is switched off for the capture.
        """
        used, renumbered = torch.unique(windows, return_inverse=True)
        self._tables = []
        for key, table in token_tables(self.model):
            self._tables.append((table, tuple(table.weight.shape), table.padding_idx))
            rows = _as(self.weights.rows(key, used.tolist()), self.dtype).to(self.device)
            table.weight = nn.Parameter(rows, requires_grad=False)
            table.padding_idx = None
        return renumbered

    def after_capture(self) -> None:
        for table, shape, padding_idx in self._tables:
            table.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
            table.padding_idx = padding_idx
        self._tables = []
        self.model.tie_weights()  # a tied LM head shares the embedding again (for parameter counts)


def token_tables(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """The embedding tables outside the blocks that token ids index (rows = the vocabulary), by
    checkpoint name: the input embeddings, and per-layer embeddings where a family has them."""
    vocab = model.get_input_embeddings().num_embeddings
    inside = {id(m) for m in decoder_blocks(model).modules()}
    return [
        (f"{name}.weight", module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab and id(module) not in inside
    ]


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in the compute dtype, so the whole output has one dtype; others unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def empty_model(
    folder: Path, weights: SafetensorsWeights, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """The model on the meta device with every tensor outside the blocks loaded onto ``device``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with loading_errors(folder):
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_blocks(model)
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    for name, parameter in model.named_parameters():  # fail now, not after the capture
        if name in weights.files and weights.shape(name) != tuple(parameter.shape):
            raise CfspError(
                f"cannot load the model in {folder}: its weights do not match the shapes in config.json "
                f"({name}: {weights.shape(name)} in the files, {tuple(parameter.shape)} from the config)"
            )
        if name.startswith(prefix) and name not in weights.files:
            block, _, inner = name[len(prefix) :].partition(".")
            if stored_tensor(f"{prefix}{block}.", inner, weights.files) is None:
                raise CfspError(
                    f"cannot load the model in {folder}: the weights have no tensor {name!r} (in any form "
                    "cfsp can stream; a quantized checkpoint needs converting to floats first)"
                )
    # Loaded on demand instead: the blocks (one at a time) and the token tables (for the capture);
    # the LM head is never run by the calibration pass.
    skip = {id(table.weight) for _, table in token_tables(model)}
    skip |= {id(p) for p in model.get_output_embeddings().parameters()}
    for name, parameter in list(model.named_parameters()):
        if not name.startswith(prefix) and id(parameter) not in skip and name in weights.files:
            _load(model, name, weights, name, device, dtype)
    for name, buffer in list(model.named_buffers()):
        if name in weights.files and not name.startswith(prefix):
            _load(model, name, weights, name, device, dtype)  # a trained buffer the checkpoint holds
        else:
            _set(model, name, device, buffer)  # rotary tables and scales, built on the CPU at init
    model.tie_weights()
    return model.eval()


def load_whole(
    folder: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> nn.Module:
    """The model of a safetensors directory, whole in memory, each tensor read into storage of its
    own with the file mapped only for that read.

    ``from_pretrained`` keeps the weights as views of the memory-mapped files: every page the
    pruning touches stays resident as long as any tensor of the file lives, so the MLP weights a
    prune removes still count, beside their pruned copies (Qwen2.5-1.5B, float32: 1.46x the
    weights at the peak, ``benchmarks/prune_cost.py``). Read like this, a removed tensor's memory
    goes back at once.
    """
    path = Path(folder).expanduser()
    execution = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, execution)
    weights = SafetensorsWeights(path)
    model = empty_model(path, weights, execution, compute_dtype)
    blocks = StreamedBlocks(model, weights, execution, compute_dtype)
    for index in range(len(decoder_blocks(model))):
        blocks.onload(index)
    model.tie_weights()
    for name, parameter in list(model.named_parameters()):  # the token tables and the LM head
        if parameter.is_meta and name in weights.files:
            _load(model, name, weights, name, execution, compute_dtype)
    model.tie_weights()
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise CfspError(f"cannot load the model in {path}: the weights have no tensor {missing[0]!r}")
    return model.eval()


def prune_directory(
    source: str | os.PathLike,
    calib: torch.Tensor | None,
    config: PruneConfig | float,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    **options,
) -> PruneResult:
    """Prune a Hugging Face safetensors directory block by block and write the pruned directory.

    Gives the same kept channels, widths and weights as ``load_model`` + ``prune`` +
    ``save_pruned``, with only one block's weights in memory at a time. ``config`` and ``options``
    are ``prune``'s (a ``PruneConfig``, or the sparsity and keywords). With the refit compensation a second pass over the blocks collects each block's
    Gram matrix just before it is refit, as in memory.
    """
    folder = Path(source).expanduser()
    check_streamable(folder)
    with StagedOutput(out_dir, overwrite, [folder, *protect]) as staging:
        return stream_into(folder, calib, config, staging, device=device, dtype=dtype, **options)


def check_streamable(folder: Path) -> None:
    """Before any work: a directory whose safetensors files can be read."""
    SafetensorsWeights(folder)


def is_streamable(path: str | os.PathLike) -> bool:
    """A Hugging Face directory with safetensors weights (not a cfsp output, not a GGUF)."""
    folder = Path(path).expanduser()
    return (
        folder.is_dir()
        and (folder / "config.json").is_file()
        and not (folder / "pruning_plan.json").exists()
        and any(folder.glob("*.safetensors"))
    )


def stream_into(
    folder: Path,
    calib: torch.Tensor | None,
    config: PruneConfig | float,
    staging: Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    **options,
) -> PruneResult:
    """The streamed pass, writing the pruned directory's files into the empty folder ``staging``."""
    from cfsp.saving import write_pruned_metadata

    execution = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, execution)
    weights = SafetensorsWeights(folder)
    model = empty_model(folder, weights, execution, compute_dtype)
    placement = StreamedBlocks(model, weights, execution, compute_dtype)
    block_prefix = placement.prefix + "."
    rest = [key for key in weights.keys() if not key.startswith(block_prefix)]
    placement.writer = ShardWriter(staging, len(decoder_blocks(model)) + len(rest))
    result = prune(model, calib, config, placement=placement, **options)
    for key in rest:  # one shard each: at most one of the large ones (embeddings, LM head) in memory
        placement.writer.write("", {key: _as(weights.get(key), compute_dtype)})
    placement.writer.finish()
    if (folder / "generation_config.json").is_file():
        shutil.copyfile(folder / "generation_config.json", staging / "generation_config.json")
    write_pruned_metadata(model, load_tokenizer(folder), result, staging)
    return result
