"""Quantized GGUF files (Q4_K_M and the other types people run) by llama.cpp's own quantizer.

cfsp writes an f16 GGUF, then ``llama_model_quantize`` (llama.cpp's ``llama-quantize``, through
llama-cpp-python) turns it into the chosen type, with llama.cpp's own per-tensor mix (Q4_K_M keeps
some ``attn_v`` / ``ffn_down`` matrices in Q6_K, the output layer in Q6_K, ...). It runs in a child
process: llama.cpp aborts the process on some errors, and its log is where it says which tensors
it could not store in the requested type.

K-quants pack each row in super-blocks of 256 values (the legacy types and IQ4_NL in blocks of 32).
A matrix whose rows are not a multiple of that is stored in a fallback type instead (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, ...; F16 when not even 32 divides them). A pruned FFN width is the row
length of ``ffn_down``, so widths in multiples of 256 (``--multiple 256``) keep it in the K-quant;
hidden sizes like SmolLM2's 576 make every matrix that reads the residual stream fall back,
pruned or not. ``QuantizeReport.fallbacks`` lists each such tensor and the type it got.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cfsp.errors import CfspError
from cfsp.export.encoding import MARKER, gguf_module

# --outtype -> llama.cpp's llama_ftype name. The IQ1/IQ2/IQ3 types need an importance matrix, which
# cfsp does not write; TQ and MXFP types are for models trained for them.
QUANT_TYPES: dict[str, str] = {
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q8_0": "MOSTLY_Q8_0",  # `cfsp export` writes q8_0 itself; this is for quantize_gguf
    "q2_k": "MOSTLY_Q2_K",
    "q3_k_s": "MOSTLY_Q3_K_S",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
    "iq4_nl": "MOSTLY_IQ4_NL",
    "iq4_xs": "MOSTLY_IQ4_XS",
}

_FALLBACK_LINE = re.compile(
    r"warning:\s+(?P<tensor>\S+)\s+- ncols\s+(?P<cols>\d+) not divisible by\s+(?P<block>\d+)"
    r" \(required for type\s+(?P<wanted>\S+)\)"
)


@dataclass(frozen=True)
class Fallback:
    """One matrix llama.cpp stored in another type than its quantization mix asked for."""

    tensor: str
    columns: int  # the row length that the wanted type's block does not divide
    wanted: str
    stored: str


@dataclass
class QuantizeReport:
    qtype: str
    fallbacks: list[Fallback] = field(default_factory=list)
    tensor_types: dict[str, str] = field(default_factory=dict)  # every tensor of the output

    def summary(self) -> str:
        """One line: which kinds of matrices fell back, in how many blocks, to what."""
        if not self.fallbacks:
            return f"every matrix got its {self.qtype} type"
        groups: dict[tuple[str, str, str], list[Fallback]] = defaultdict(list)
        for item in self.fallbacks:
            kind = re.sub(r"^blk\.\d+\.", "", item.tensor)
            groups[(kind, item.wanted, item.stored)].append(item)
        parts = []
        for (kind, wanted, stored), items in sorted(groups.items()):
            columns = sorted({item.columns for item in items})
            parts.append(
                f"{kind} x{len(items)} (rows of {', '.join(map(str, columns))}) {wanted} -> {stored}"
            )
        return f"{len(self.fallbacks)} matrices fell back: " + "; ".join(parts)


def check_quant_type(qtype: str) -> None:
    """A type llama.cpp's quantizer offers, and llama.cpp installed: checked before any work."""
    if qtype not in QUANT_TYPES:
        raise CfspError(f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    from cfsp.llamacpp import llama_cpp_module

    llama_cpp_module()  # installed, or one line saying how to install it


def run_quantizer(source: Path, out: Path, qtype: str, threads: int | None = None) -> QuantizeReport:
    """Quantize the f16/f32/bf16 GGUF ``source`` into ``out``, a path inside a staged output."""
    from importlib import metadata

    version = metadata.version("cfsp")
    command = [
        sys.executable,
        "-m",
        "cfsp.export.quantize",
        str(source),
        str(out),
        qtype,
        str(threads or 0),
        version,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    log = done.stderr + done.stdout
    if done.returncode != 0 or not out.is_file():
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        raise CfspError(f"llama.cpp's quantizer could not write {qtype}: {why}")
    types = {t.name: t.tensor_type.name.lower() for t in gguf_module().GGUFReader(out).tensors}
    fallbacks = []
    for match in _FALLBACK_LINE.finditer(log):
        tensor = match["tensor"]
        fallbacks.append(
            Fallback(tensor, int(match["cols"]), match["wanted"].lower(), types.get(tensor, "?"))
        )
    return QuantizeReport(qtype, fallbacks, types)


def _run(source: str, out: str, qtype: str, threads: int, version: str) -> int:
    """In the child process: call llama.cpp, its log going to stderr. The output gets cfsp's
    marker key (also when the input came from llama.cpp's converter), so --overwrite may replace it."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def to_stderr(_level: int, text: bytes, _user_data) -> None:  # every line, warnings included
        sys.stderr.write(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(to_stderr, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANT_TYPES[qtype]}")
    params.nthread = threads
    overrides = (llama_cpp.llama_model_kv_override * 2)()  # the last one, all zeros, ends the list
    overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
    overrides[0].key = MARKER.encode()
    overrides[0].value.val_str = version.encode()[:127]
    params.kv_overrides = overrides
    return int(llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)))


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
