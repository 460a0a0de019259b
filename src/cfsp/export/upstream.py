"""GGUF through llama.cpp's own converter, for the families cfsp's ``deci`` writer does not cover.

A uniform output (``--uniform``: one width in every block) is the family's stock checkpoint, so
``convert_hf_to_gguf.py`` from llama.cpp converts it like the original model, for every
architecture it knows (Qwen3, Gemma 2/3, Phi-3, OLMo, GLM-4, ...), tokenizer included. cfsp runs
that script as it is published, from the same llama.cpp version as the runtime the ``llamacpp``
extra builds: ``make install`` unpacks it, with its ``conversion`` package and ``gguf-py``, from the
llama-cpp-python source distribution into ``.venv/llama.cpp``; ``CFSP_LLAMA_CPP_CONVERTER`` names
another llama.cpp checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cfsp.errors import CfspError

CONVERTER_ENV = "CFSP_LLAMA_CPP_CONVERTER"
SCRIPT = "convert_hf_to_gguf.py"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def converter_dir() -> Path:
    """The llama.cpp folder holding ``convert_hf_to_gguf.py`` (and ``gguf-py``)."""
    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "llama.cpp").expanduser()
    if not (folder / SCRIPT).is_file():
        raise CfspError(
            f"llama.cpp's converter is not in {folder}; run `make install` (it unpacks {SCRIPT} from the "
            f"llama-cpp-python source distribution) or set {CONVERTER_ENV} to a llama.cpp checkout"
        )
    return folder


def convert(folder: Path, path: Path, outtype: str) -> str:
    """Run llama.cpp's converter on the Hugging Face directory ``folder``, writing ``path``;
    returns the converter's last line. Its own error, if any, becomes one ``error:`` line."""
    if outtype not in OUTTYPES:
        raise CfspError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    where = converter_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(where / "gguf-py"), str(where)]))
    command = [sys.executable, str(where / SCRIPT), str(folder), "--outfile", str(path), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    if done.returncode != 0 or not path.is_file():
        why = next(
            (line for line in reversed(lines) if "Error" in line or "error" in line),
            lines[-1] if lines else "",
        )
        raise CfspError(f"llama.cpp's converter could not convert {folder}: {why.strip()}")
    return lines[-1] if lines else ""
