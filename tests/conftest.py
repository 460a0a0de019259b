"""Tiny randomly initialised models of every supported family, and a byte-level tokenizer.

Everything here is built from configs in memory: no network, no weights on disk, seconds to run.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 260  # 256 bytes + 4 specials
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**COMMON),
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2
    ),
}
FAMILIES = list(FAMILY_CONFIGS)


def make_tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` in float32 and eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family](), dtype=torch.float32)
    # Random init leaves near-identical channel statistics; spread them so rankings are meaningful.
    with torch.no_grad():
        for layer in model.model.layers:
            scale = torch.rand(layer.mlp.up_proj.out_features) * 2 + 0.1
            layer.mlp.up_proj.weight.mul_(scale[:, None])
    return model.eval()


def llama_cpp_agreement(path, model, ids: torch.Tensor) -> dict:
    """How llama.cpp running the GGUF ``path`` agrees with ``model`` in transformers on ``ids`` [1, L]:
    the share of equal next-token predictions and both perplexities."""
    from cfsp.llamacpp import perplexity, token_logits

    with torch.no_grad():
        reference = model(ids).logits
    top1 = float((token_logits(path, ids).argmax(-1) == reference.argmax(-1)).float().mean())
    nll = torch.nn.functional.cross_entropy(reference[0, :-1], ids[0, 1:])
    return {
        "top1": top1,
        "ppl_transformers": float(torch.exp(nll)),
        "ppl_llamacpp": float(perplexity(path, ids)),
    }


def assert_llama_cpp_agrees(path, model, ids: torch.Tensor) -> None:
    """llama.cpp running the GGUF ``path`` predicts the next tokens of ``ids`` [1, L] like ``model``
    in transformers (>= 98 % top-1) with the perplexity within 1 %."""
    agreement = llama_cpp_agreement(path, model, ids)
    assert agreement["top1"] >= 0.98
    assert agreement["ppl_llamacpp"] == pytest.approx(agreement["ppl_transformers"], rel=0.01)


def cli_prune_args(folder, nsamples: int = 4, model: torch.nn.Module | None = None) -> list[str]:
    """``cfsp prune`` arguments for a tiny Llama (or ``model``) saved in ``folder`` with a small text
    corpus."""
    source, corpus = folder / "m", folder / "corpus.txt"
    (model or make_tiny_model("llama")).save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    corpus.write_text("\n".join(f"sentence number {i} for calibration" for i in range(300)))
    return ["prune", "--model", str(source), "--calib-source", str(corpus), "--nsamples", str(nsamples),
            "--seqlen", "32", "--multiple", "32"]  # fmt: skip


def recover_briefly(model, result, folder):
    """Eight IG-LoRA steps on a tiny text; returns (the recovery's result, loss before, loss after)."""
    from cfsp.recovery import PadCollator, RecoveryConfig, load_recovery_data, recover

    tokenizer = make_byte_tokenizer()
    text = folder / "tiny.txt"
    text.write_text("the cat sat on the mat and the dog ran to the log. " * 30, encoding="utf-8")
    dataset = load_recovery_data(text, tokenizer, seqlen=32)
    batch = PadCollator(0)([dataset[i] for i in range(len(dataset))])

    def loss(net) -> float:
        with torch.no_grad():
            return net(**batch).loss.item()

    before = loss(model)
    config = RecoveryConfig(steps=8, lr=1e-2, batch_size=4, grad_accum=1, seqlen=32, save_steps=100)
    done = recover(model, tokenizer, dataset, result.block_importance, config, output_dir=folder / "run")
    return done, before, loss(done.model)


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (ids 4..259 are bytes) that needs no files."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for byte, char in enumerate(_byte_chars()):
        vocab[char] = byte + 4
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with one merge (llama.cpp refuses a BPE vocabulary without merges)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for byte, char in enumerate(_byte_chars()[:255]):
        vocab[char] = byte + 4
    vocab["ab"] = 259
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _byte_chars() -> list[str]:
    """The printable stand-in character of each byte, in byte order (GPT-2's byte-level map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run several times faster on one thread than on two contended cores."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_tiny_model(family)


@pytest.fixture(scope="session")
def tokenizer():
    return make_byte_tokenizer()


@pytest.fixture
def calib() -> torch.LongTensor:
    """Sixteen random windows of 64 tokens."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, VOCAB, (16, 64), generator=generator)  # enough tokens for the refit
