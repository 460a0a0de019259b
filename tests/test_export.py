"""GGUF export: the file's layout (without llama.cpp), and llama.cpp's logits against transformers."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_llama_cpp_agrees, bpe_tokenizer, make_tiny_model
from gguf import GGUFReader

import cfsp
from cfsp.errors import CfspError
from cfsp.export import export_gguf, llama3_rope_factors, permute_rotary
from cfsp.llamacpp import perplexity, token_logits
from cfsp.models import count_parameters

EXPORTABLE = ["llama", "mistral", "qwen2"]


def pruned_directory(family: str, folder, method: str = "flap", compensation: str = "refit"):
    """A tiny model pruned to uneven widths (FLAP's global ranking), with its down_proj bias."""
    model = make_tiny_model(family)
    calib = torch.randint(4, 260, (16, 64), generator=torch.Generator().manual_seed(0))
    result = cfsp.prune(model, calib, 0.5, method=method, compensation=compensation, progress=False)
    cfsp.save_pruned(model, bpe_tokenizer(), result, folder)
    return model, result


def test_permutation_turns_half_split_rotation_into_pairwise_rotation():
    heads, head_dim = 3, 8
    q = torch.arange(heads * head_dim, dtype=torch.float32)
    permuted = permute_rotary(q, heads).reshape(heads, head_dim)
    first = q.reshape(heads, 2, head_dim // 2)  # HF: dims i and i + head_dim / 2 rotate together
    assert torch.equal(permuted[:, 0::2], first[:, 0]) and torch.equal(permuted[:, 1::2], first[:, 1])


def test_llama3_rope_factors_match_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = llama3_rope_factors({"rope_parameters": params}, 64)
    assert np.allclose(base.numpy() / factors, scaled.double().numpy(), rtol=1e-5)


@pytest.mark.parametrize("family", EXPORTABLE)
def test_file_holds_per_block_widths_biases_and_tokenizer(family, tmp_path):
    model, result = pruned_directory(family, tmp_path / "pruned")
    export_gguf(tmp_path / "pruned", tmp_path / "m.gguf", "f16", progress=False)
    reader = GGUFReader(tmp_path / "m.gguf")
    fields = reader.fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["deci.feed_forward_length"].contents() == result.widths
    assert len(set(result.widths)) > 1
    assert len(fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size
    assert fields["tokenizer.ggml.merges"].contents() == ["a b"]
    tensors = {t.name: t for t in reader.tensors}
    for i, width in enumerate(result.widths):
        assert tensors[f"blk.{i}.ffn_down.weight"].shape.tolist() == [width, model.config.hidden_size]
        bias = np.asarray(tensors[f"blk.{i}.ffn_down.bias"].data)
        assert np.allclose(bias, model.model.layers[i].mlp.down_proj.bias.detach().numpy(), atol=1e-6)
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")


def test_q8_0_quantizes_matrices_whose_rows_fit_its_blocks(tmp_path):
    pruned_directory("llama", tmp_path / "pruned")
    export_gguf(tmp_path / "pruned", tmp_path / "m.gguf", "q8_0", progress=False)
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.ffn_up.weight"] == "Q8_0"
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # rows of 133 channels: not a multiple of 32


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_architectures_llama_cpp_cannot_run_pruned_are_refused_in_one_line(family, tmp_path):
    pruned_directory(family, tmp_path / "m")  # FLAP: a different width in every block
    with pytest.raises(CfspError, match=f"cannot export a {family} model with per-block widths") as info:
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", progress=False)
    assert "\n" not in str(info.value) and "--uniform" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_export_replaces_only_its_own_files(tmp_path):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    bpe_tokenizer().save_pretrained(tmp_path / "m")
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("mine")
    with pytest.raises(CfspError, match="exists; choose another path or pass --overwrite"):
        export_gguf(tmp_path / "m", foreign, progress=False)
    with pytest.raises(CfspError, match="it was not written by cfsp"):
        export_gguf(tmp_path / "m", foreign, overwrite=True, progress=False)
    assert foreign.read_text() == "mine"
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", progress=False)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32", overwrite=True, progress=False)
    assert GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.gguf", "notes.gguf"]


def test_a_dense_model_exports_with_one_width(tmp_path):
    model = make_tiny_model("mistral")
    model.save_pretrained(tmp_path / "m")
    bpe_tokenizer().save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32", progress=False)
    widths = GGUFReader(tmp_path / "m.gguf").fields["deci.feed_forward_length"].contents()
    assert widths == [model.config.intermediate_size] * model.config.num_hidden_layers


# --------------------------------------------------------------------------- through llama.cpp


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", EXPORTABLE)
@pytest.mark.parametrize("method, compensation", [("flap", "refit"), ("cfsp", "mean")])
def test_llama_cpp_logits_match_transformers(family, method, compensation, tmp_path):
    model, result = pruned_directory(family, tmp_path / "pruned", method, compensation)
    ids = torch.randint(4, 260, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    for outtype, tolerance in (("f32", 1e-3), ("f16", 5e-2)):
        export_gguf(tmp_path / "pruned", tmp_path / f"{outtype}.gguf", outtype, progress=False)
        logits = token_logits(tmp_path / f"{outtype}.gguf", ids)
        assert (logits - reference).abs().max() < tolerance * reference.abs().max()
        assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.98


@pytest.mark.llamacpp
def test_llama_cpp_perplexity_matches_transformers(tmp_path):
    model, _ = pruned_directory("qwen2", tmp_path / "pruned")
    export_gguf(tmp_path / "pruned", tmp_path / "m.gguf", "f32", progress=False)
    ids = torch.randint(4, 260, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert perplexity(tmp_path / "m.gguf", ids) == pytest.approx(float(torch.exp(nll)), rel=1e-4)


@pytest.mark.llamacpp
def test_bench_cli_times_two_gguf_files(tmp_path):
    from typer.testing import CliRunner

    from cfsp.cli import app

    make_tiny_model("llama").save_pretrained(tmp_path / "dense")
    bpe_tokenizer().save_pretrained(tmp_path / "dense")
    pruned_directory("llama", tmp_path / "pruned")
    export_gguf(tmp_path / "dense", tmp_path / "dense.gguf", "f32", progress=False)
    export_gguf(tmp_path / "pruned", tmp_path / "pruned.gguf", "f32", progress=False)
    args = ["bench", "--engine", "llamacpp", str(tmp_path / "dense.gguf"), str(tmp_path / "pruned.gguf")]
    args += ["--prompt-lengths", "16", "--decode-tokens", "4", "--repeats", "1"]
    args += ["--output", str(tmp_path / "b.json")]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["engine"] == "llama.cpp" and report["param_ceiling"] > 1.0
    row = report["rows"][0]
    assert row["prompt_length"] == 16 and row["pruned"]["decode_tokens_per_s"] > 0
    refused = CliRunner().invoke(app, [*args[:5], "--batch-sizes", "4"])
    assert refused.exit_code == 2 and "one sequence at a time" in refused.output


@pytest.mark.parametrize("tied", [False, True])
def test_decode_weights_count_one_embedding_row_unless_the_head_is_tied(tied, tmp_path):
    """What a decoded token reads, from the model and from its GGUF file alike."""
    from cfsp.llamacpp import gguf_decode_parameters
    from cfsp.speed import decode_read_parameters

    model = make_tiny_model("llama")
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    total, embedding = count_parameters(model), model.get_input_embeddings().weight
    expected = total if tied else total - embedding.numel() + embedding.shape[1]
    assert decode_read_parameters(model) == expected
    model.save_pretrained(tmp_path / "m")
    bpe_tokenizer().save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32", progress=False)
    assert gguf_decode_parameters(tmp_path / "m.gguf") == expected


# --------------------------------------------------------------------------- llama.cpp's own converter


def smollm2_tokenizer():
    """SmolLM2's real tokenizer (a pre-tokenizer llama.cpp's converter recognises), without the model."""
    from cfsp.models import load_tokenizer, resolve_gguf

    try:
        path = resolve_gguf("smollm2")
    except CfspError as exc:  # the model package is installed by `make test`
        pytest.skip(str(exc))
    return load_tokenizer(path.parent, path.name)


def qwen3_with_smollm2_vocabulary():
    """A tiny random Qwen3 (4 heads, 2 KV heads) with SmolLM2's tokenizer, which llama.cpp's
    converter recognises; returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tokenizer


@pytest.mark.llamacpp
def test_uniform_qwen3_goes_through_llama_cpps_converter_and_matches_transformers(tmp_path):
    model, tokenizer = qwen3_with_smollm2_vocabulary()
    calib = torch.randint(100, len(tokenizer), (16, 64), generator=torch.Generator().manual_seed(0))
    result = cfsp.prune(model, calib, 0.5, multiple=32, uniform=True, progress=False)
    cfsp.save_pruned(model, tokenizer, result, tmp_path / "uniform")
    export_gguf(tmp_path / "uniform", tmp_path / "q.gguf", "f32", progress=False)
    reader = GGUFReader(tmp_path / "q.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen3"  # the converter's, not cfsp's deci
    assert reader.fields["qwen3.feed_forward_length"].contents() == result.widths[0]
    from cfsp.evaluation import wikitext_ids

    assert_llama_cpp_agrees(tmp_path / "q.gguf", model, wikitext_ids(tokenizer)[:64].reshape(1, 64))
    for overwrite in (False, True):  # quantized from the converter's file, marked as cfsp's: replaceable
        export_gguf(tmp_path / "uniform", tmp_path / "q4.gguf", "q4_k_m", overwrite=overwrite, progress=False)
    fields = GGUFReader(tmp_path / "q4.gguf").fields
    assert fields["general.architecture"].contents() == "qwen3" and "cfsp.version" in fields
    assert fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf", "q4.gguf", "uniform"]


def test_missing_converter_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CFSP_LLAMA_CPP_CONVERTER", str(tmp_path / "nowhere"))
    model = make_tiny_model("qwen3")
    calib = torch.randint(4, 260, (16, 64), generator=torch.Generator().manual_seed(0))
    result = cfsp.prune(model, calib, 0.5, multiple=32, uniform=True, progress=False)
    cfsp.save_pruned(model, None, result, tmp_path / "u")
    with pytest.raises(CfspError, match="make install"):
        export_gguf(tmp_path / "u", tmp_path / "u.gguf", progress=False)
    assert not (tmp_path / "u.gguf").exists()
