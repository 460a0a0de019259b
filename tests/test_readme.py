"""Every Python snippet of the README and of the documentation pages runs as written.

The snippets name the default model; here ``cfsp.load_model`` hands back a tiny random LLaMA with a
byte-level tokenizer instead, so the documented calls, arguments and result fields are checked in
seconds (the real SmolLM2 path is covered by the integration tests).
"""

import re
from pathlib import Path

import pytest
from conftest import make_byte_tokenizer, make_tiny_model

import cfsp

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def python_snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def run_snippets(path: Path, monkeypatch, tmp_path) -> dict:
    monkeypatch.setattr(cfsp, "load_model", lambda *a, **k: (make_tiny_model("llama"), make_byte_tokenizer()))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in python_snippets(path):
        exec(compile(snippet, str(path), "exec"), namespace)
    return namespace


def test_readme_python_snippet_runs(monkeypatch, tmp_path):
    assert len(python_snippets(README)) == 1
    namespace = run_snippets(README, monkeypatch, tmp_path)
    assert cfsp.read_plan(tmp_path / "out" / "smollm2-50")["widths"] == namespace["plan"].widths
    assert namespace["scores"]["results"]["wikitext2"]["ppl"] > 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documentation_python_snippets_run(page, monkeypatch, tmp_path):
    namespace = run_snippets(page, monkeypatch, tmp_path)
    if page.name == "python.md":
        assert namespace["speed"]["param_ceiling"] > 1
        assert namespace["recovered"].steps == 20
        assert namespace["reconstructed"].reconstruction
        assert namespace["config"].allocation == "global" and namespace["reference"].selection == "threshold"


def test_the_python_page_documents_every_pruning_option_with_its_default():
    from cfsp.config import field_default, flat_fields

    page = (ROOT / "docs" / "python.md").read_text(encoding="utf-8")
    for name, field, _nested in flat_fields():
        assert f"| `{name}` | `{field_default(field)!r}` |" in page, name


def test_the_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").encode()) <= 12_000
