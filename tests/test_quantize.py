"""Quantized GGUF through llama.cpp's own quantizer: files that run, fallbacks named, errors in one line."""

import pytest
import torch
from conftest import COMMON, bpe_tokenizer
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, LlamaConfig

import cfsp
from cfsp.errors import CfspError
from cfsp.export import export_gguf, is_cfsp_gguf, quantize_gguf

pytestmark = pytest.mark.llamacpp

# Rows of 256 (hidden size, attention width) fit K-quant super-blocks; the pruned FFN widths, in
# multiples of 128, do not all.
WIDE = dict(COMMON, hidden_size=256, intermediate_size=768, num_hidden_layers=3)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Llama with 256-wide rows, pruned to per-block widths in multiples of 128, exported as f16."""
    folder = tmp_path_factory.mktemp("quantize")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**WIDE), dtype=torch.float32).eval()
    with torch.no_grad():  # spread the channels' scales so the allocation differs between blocks
        for index, layer in enumerate(model.model.layers):
            layer.mlp.up_proj.weight.mul_(torch.rand(768)[:, None] * 2 + 0.1 + index)
    calib = torch.randint(4, 260, (16, 64), generator=torch.Generator().manual_seed(0))
    result = cfsp.prune(model, calib, 0.5, multiple=128, compensation="mean", progress=False)
    cfsp.save_pruned(model, bpe_tokenizer(), result, folder / "m")
    export_gguf(folder / "m", folder / "m.gguf", "f16", progress=False)
    ids = torch.randint(4, 260, (1, 64), generator=torch.Generator().manual_seed(1))
    return model, result.widths, folder, ids


def test_fallbacks_name_exactly_the_rows_that_k_quants_cannot_pack(pruned):
    model, widths, folder, _ = pruned
    assert any(w % 256 for w in widths) and any(w % 256 == 0 for w in widths), widths
    report = quantize_gguf(folder / "m.gguf", folder / "q4km.gguf", "q4_k_m")
    expected = {f"blk.{i}.ffn_down.weight" for i, w in enumerate(widths) if w % 256}
    assert {f.tensor for f in report.fallbacks} == expected
    for item in report.fallbacks:
        assert item.wanted in ("q4_k", "q6_k") and item.columns % 256
        assert item.stored == report.tensor_types[item.tensor] and item.stored in ("q5_0", "q8_0")
    assert report.tensor_types["blk.0.ffn_up.weight"] == "q4_k"
    assert "ffn_down.weight x" in report.summary()


@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_quantized_exports_run_in_llama_cpp_close_to_transformers(pruned, outtype):
    """q8_0: the next-token choice of transformers at >= 95 % of positions; q4_k_m (4.5 bits per
    weight): perplexity within 2 % of transformers'."""
    from cfsp.llamacpp import perplexity, token_logits

    model, _, folder, ids = pruned
    path = folder / f"{outtype}.gguf"
    export_gguf(folder / "m", path, outtype, progress=False)
    assert is_cfsp_gguf(path)  # the quantizer keeps cfsp's marker: --overwrite may replace it
    with torch.no_grad():
        reference = model(ids).logits
    if outtype == "q8_0":
        agree = (token_logits(path, ids).argmax(-1) == reference.argmax(-1)).float().mean()
        assert agree >= 0.95
    else:
        assert GGUFReader(path).fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        nll = torch.nn.functional.cross_entropy(reference[0, :-1], ids[0, 1:])
        assert perplexity(path, ids) == pytest.approx(float(torch.exp(nll)), rel=0.02)


def test_bad_types_and_existing_outputs_are_one_line_errors_with_nothing_written(pruned, tmp_path):
    from typer.testing import CliRunner

    from cfsp.cli import app

    _, _, folder, _ = pruned
    out = tmp_path / "q.gguf"
    with pytest.raises(CfspError, match="unknown --outtype 'q4_k_x'") as info:
        export_gguf(folder / "m", out, "q4_k_x", progress=False)
    assert "\n" not in str(info.value) and "q4_k_m" in str(info.value)
    out.write_bytes(b"not mine")
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(folder / "m"), "--out", str(out), "--outtype", "q4_k_m"])
    assert done.exit_code == 2 and done.output.count("error:") == 1
    assert out.read_bytes() == b"not mine" and sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


def test_a_failing_quantizer_is_one_line_and_leaves_nothing(tmp_path):
    source = tmp_path / "broken.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CfspError, match="llama.cpp's quantizer could not write q4_k_m") as info:
        quantize_gguf(source, tmp_path / "out.gguf", "q4_k_m")
    assert "\n" not in str(info.value) and not (tmp_path / "out.gguf").exists()


def test_a_real_llama_config_prunes_exports_and_quantizes(tmp_path):
    """Llama-3.2-1B's published config (llama3 rope scaling, tied embeddings, its bos/eos ids),
    shrunk in sizes: pruned, exported as q4_k_m, run in llama.cpp close to transformers."""
    from real_models import make_real_model

    from cfsp.llamacpp import perplexity

    model = make_real_model("llama-3.2-1b", vocab=260)
    calib = torch.randint(4, 260, (16, 64), generator=torch.Generator().manual_seed(0))
    result = cfsp.prune(model, calib, 0.5, multiple=32, progress=False)
    cfsp.save_pruned(model, bpe_tokenizer(), result, tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_k_m", progress=False)
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert (
        fields["general.file_type"].contents() == 15
        and fields["deci.feed_forward_length"].contents() == result.widths
    )
    ids = torch.randint(4, 260, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    assert perplexity(tmp_path / "m.gguf", ids) == pytest.approx(float(torch.exp(nll)), rel=0.05)
