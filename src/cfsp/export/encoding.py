"""How each tensor is stored in the GGUF file: f32, f16, bf16 or q8_0 (and the ``gguf``
package that writes them)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from cfsp.errors import CfspError

log = logging.getLogger("cfsp")


OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MARKER = "cfsp.version"  # a GGUF key that marks cfsp's own files (what --overwrite may replace)


def gguf_module():
    """The ``gguf`` package, with a one-line hint where it is missing."""
    try:
        import gguf
    except ImportError:
        raise CfspError("GGUF export needs the gguf package; run: pip install gguf") from None
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its notes repeat what cfsp reports
    return gguf


def storage_type(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is stored in: vectors and norms stay float32, as llama.cpp expects."""
    gguf = gguf_module()
    kinds = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_name.endswith("_norm.weight") or outtype == "f32":
        return kinds.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[kinds.Q8_0][0]
        return kinds.Q8_0 if shape[-1] % block == 0 else kinds.F16
    return {"f16": kinds.F16, "bf16": kinds.BF16}[outtype]


def encode(tensor: torch.Tensor, kind) -> np.ndarray:
    gguf = gguf_module()
    data = tensor.detach().to("cpu", torch.float32).numpy()
    return gguf.quants.quantize(data, kind)


def byte_shape(shape: tuple[int, ...], kind) -> tuple[tuple[int, ...], int]:
    """(numpy shape, bytes) of a tensor of ``shape`` stored as ``kind``."""
    gguf = gguf_module()
    kinds = gguf.GGMLQuantizationType
    if kind == kinds.F32:
        return shape, 4 * math.prod(shape)
    if kind == kinds.F16:
        return shape, 2 * math.prod(shape)
    stored = gguf.quants.quant_shape_to_byte_shape(shape, kind)
    return stored, math.prod(stored)
