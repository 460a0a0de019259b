"""Export to GGUF, the file llama.cpp (and ollama, LM Studio on top of it) serves.

llama.cpp reads a per-layer ``feed_forward_length`` array for every architecture, but builds
per-layer FFN tensors only for a few; ``llama``, ``qwen2``, ``qwen3`` and ``gemma3`` take layer 0's
width for all layers. Its ``deci`` architecture is a Llama-style decoder (RMSNorm, rotary
attention with optional q/k/v/o biases, SiLU-gated FFN with optional biases) that creates each
layer's FFN from its own width, so Llama, Mistral and Qwen2 models, pruned or dense, are written as
``deci``. Differences from the Hugging Face layout, all taken care of here:

- llama.cpp's ``deci`` rotates consecutive pairs of each head's dimensions, Hugging Face rotates
  the first half against the second, so the rows of q and k (and their biases) are permuted;
- Llama-3's frequency-dependent rope scaling is a ``rope_freqs`` tensor of per-frequency factors;
- the tokenizer travels as ``tokenizer.ggml.*`` metadata: copied verbatim from the source GGUF
  when the model came from one, else built from the directory's ``tokenizer.json``.

Tensors are converted and written one at a time, straight from the safetensors files of a
directory, so exporting needs about one tensor's memory, not the model's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from cfsp import layouts
from cfsp.errors import CfspError
from cfsp.export import upstream
from cfsp.export.deci import (
    ARCH,
    EXPORTABLE,
    DeciShape,
    check_exportable,
    dropped_attention_from_config,
    layer_widths_from_config,
    llama3_rope_factors,
    permute_rotary,
    rope_settings,
    tensor_plan,
    write_hyperparameters,
)
from cfsp.export.encoding import MARKER, OUTTYPES, byte_shape, encode, gguf_module, storage_type
from cfsp.export.quantize import QUANT_TYPES, QuantizeReport, check_quant_type, run_quantizer
from cfsp.export.source import ExportSource, open_source
from cfsp.export.tokenizer import tokenizer_metadata
from cfsp.outdir import StagedOutput

log = logging.getLogger("cfsp")
__all__ = [
    "EXPORTABLE",
    "OUTTYPES",
    "QUANT_TYPES",
    "QuantizeReport",
    "check_exportable",
    "export_gguf",
    "llama3_rope_factors",
    "permute_rotary",
    "quantize_gguf",
]


# --------------------------------------------------------------------------- the export


def is_cfsp_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file that cfsp wrote (the only kind --overwrite replaces)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                return False
        return MARKER in gguf_module().GGUFReader(path).fields
    except (OSError, ValueError):
        return False


def export_gguf(
    model: str | os.PathLike,
    out: str | os.PathLike,
    outtype: str = "f16",
    tokenizer_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``model`` (pruned directory, HF directory, named default or .gguf) as a GGUF file.

    ``outtype``: f32, f16, bf16 or q8_0, written directly (matrices; norms and biases stay
    float32), or one of ``QUANT_TYPES`` (q4_k_m, q5_k_m, q6_k, ...): an f16 file first, then
    llama.cpp's quantizer; matrices it had to store in a fallback type are logged. The file is
    written under a reservation like every cfsp output and appears whole or not at all.
    """
    if outtype not in OUTTYPES and outtype not in QUANT_TYPES:
        choices = ", ".join([*OUTTYPES, *QUANT_TYPES])
        raise CfspError(f"unknown --outtype {outtype!r}; choose one of {choices}")
    if outtype in QUANT_TYPES:
        check_quant_type(outtype)  # before any work: llama.cpp installed, or one line saying how
    folder = Path(str(model)).expanduser()
    staged = StagedOutput(out, overwrite, [model] if folder.exists() else [], own_file=is_cfsp_gguf)
    write = _writer_of(model, tokenizer_from, progress)
    with staged as path:
        if outtype in OUTTYPES:
            how = write(path, outtype)
        else:
            unquantized = path.parent / "unquantized.gguf"  # inside the staging folder
            how = write(unquantized, "f16")
            report = run_quantizer(unquantized, path, outtype)
            unquantized.unlink()
            how += f", quantized to {outtype} by llama.cpp; {report.summary()}"
            if report.fallbacks:
                log.warning(f"{out}: {report.summary()}")
    log.info(f"wrote {out} {how}")
    return Path(out)


def quantize_gguf(
    source: str | os.PathLike, out: str | os.PathLike, qtype: str, overwrite: bool = False
) -> QuantizeReport:
    """Quantize an f16/f32/bf16 GGUF file into ``qtype`` (one of ``QUANT_TYPES``) with llama.cpp's
    quantizer: one unquantized export, many quantized files. Staged like every cfsp output."""
    from cfsp.llamacpp import _check_gguf

    check_quant_type(qtype)
    source = _check_gguf(source)
    with StagedOutput(out, overwrite, [source], own_file=is_cfsp_gguf) as path:
        report = run_quantizer(source, path, qtype)
    log.info(f"wrote {out}, quantized to {qtype} by llama.cpp; {report.summary()}")
    return report


def _writer_of(model: str | os.PathLike, tokenizer_from, progress: bool) -> Callable[[Path, str], str]:
    """The function that writes ``model`` as GGUF to a path in a direct type, checked up front.

    One width in every block of a family cfsp's writer does not cover: the stock checkpoint, which
    llama.cpp's own converter handles. Else cfsp's ``deci`` writer.
    """
    folder = Path(str(model)).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        kind = config.get("model_type")
        uniform = len(set(layer_widths_from_config(config))) == 1
        if kind not in EXPORTABLE and uniform and not dropped_attention_from_config(config):

            def convert(path: Path, outtype: str) -> str:
                upstream.convert(folder, path, outtype)
                return f"with llama.cpp's own converter (convert_hf_to_gguf.py, its {kind} architecture)"

            return convert
    source = open_source(model, tokenizer_from)
    shape = check_exportable(source.config)
    plan = tensor_plan(source.weights, source.config, shape)
    tokenizer = tokenizer_metadata(source, source.weights.shape(layouts.EMBEDDINGS)[0])

    def write(path: Path, outtype: str) -> str:
        writer = gguf_module().GGUFWriter(path, ARCH)
        _write(writer, source, shape, plan, outtype, tokenizer, progress)
        widths = f"{min(shape.widths)}..{max(shape.widths)}"
        return f"as llama.cpp's deci architecture, cfsp's own writer ({shape.layers} blocks, FFN widths {widths})"

    return write


def _write(
    writer, source: ExportSource, shape: DeciShape, plan, outtype: str, tokenizer: dict, progress: bool
):
    from importlib import metadata

    from tqdm.auto import tqdm

    gguf = gguf_module()
    writer.add_name(source.name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[outtype]
    )
    writer.add_string(MARKER, metadata.version("cfsp"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyperparameters(writer, source.config, shape)
    for key, value in tokenizer.items():
        writer.add_key_value(key, value.value, value.type, value.sub_type)
    entries = list(_entries(source, shape, plan, outtype))
    for name, tensor_shape, kind, _ in entries:
        stored, nbytes = byte_shape(tensor_shape, kind)
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            kind, np.uint8
        )
        writer.add_tensor_info(name, stored, np.dtype(dtype), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, kind, read in tqdm(entries, desc="writing GGUF", unit="tensor", disable=not progress):
        writer.write_tensor_data(encode(read(), kind))
    writer.close()


def _entries(source: ExportSource, shape: DeciShape, plan, outtype: str) -> Iterator[tuple]:
    """(GGUF name, logical shape in numpy order, storage type, reader) per tensor, in file order."""
    for gguf_name, hf_name, transform in plan:
        tensor_shape = source.weights.shape(hf_name)

        def read(hf_name=hf_name, transform=transform):
            tensor = source.weights.get(hf_name)
            return transform(tensor) if transform is not None else tensor

        yield gguf_name, tensor_shape, storage_type(gguf_name, tensor_shape, outtype), read
    _, rope_type, _ = rope_settings(source.config)
    if rope_type == "llama3":
        factors = torch.from_numpy(llama3_rope_factors(source.config, shape.head_dim))
        yield (
            "rope_freqs.weight",
            tuple(factors.shape),
            gguf_module().GGMLQuantizationType.F32,
            lambda: factors,
        )
