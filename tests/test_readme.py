"""Every Python snippet of the README runs as written.

The snippets name the default model; here ``cfsp.load_model`` hands back a tiny random LLaMA with a
byte-level tokenizer instead, so the documented calls, arguments and result fields are checked in
seconds (the real SmolLM2 path is covered by the integration tests).
"""

import re
from pathlib import Path

from conftest import make_byte_tokenizer, make_tiny_model

import cfsp

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_snippets_run(monkeypatch, tmp_path):
    snippets = python_snippets()
    assert len(snippets) >= 2
    monkeypatch.setattr(cfsp, "load_model", lambda *a, **k: (make_tiny_model("llama"), make_byte_tokenizer()))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    assert cfsp.read_plan(tmp_path / "out" / "smollm2-50")["widths"] == namespace["result"].widths
    assert namespace["scores"]["results"]["wikitext2"]["ppl"] > 1
    assert namespace["speed"]["param_ceiling"] > 1
    assert namespace["recovered"].steps == 20
