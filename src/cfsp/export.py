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
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfsp.errors import CfspError
from cfsp.outdir import PLAN_FILE, StagedOutput

log = logging.getLogger("cfsp")

ARCH = "deci"
EXPORTABLE = ("llama", "mistral", "qwen2")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MARKER = "cfsp.version"  # a GGUF key that marks cfsp's own files (what --overwrite may replace)

_NOT_EXPORTABLE = {
    "qwen3": "its attention normalises q and k per head, which llama.cpp's deci architecture lacks",
    "gemma3_text": "its blocks have four norms, scaled embeddings and sliding-window layers, which "
    "llama.cpp's deci architecture lacks",
}
_NOT_EXPORTABLE["gemma3"] = _NOT_EXPORTABLE["gemma3_text"]

_BLOCK_TENSORS = {  # Hugging Face name inside model.layers.N -> GGUF name inside blk.N
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_module():
    """The ``gguf`` package, with a one-line hint where it is missing."""
    try:
        import gguf
    except ImportError:
        raise CfspError("GGUF export needs the gguf package; run: pip install gguf") from None
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its notes repeat what cfsp reports
    return gguf


# --------------------------------------------------------------------------- where tensors come from


class StateDictWeights:
    """An in-memory model's tensors behind the interface of ``weights.SafetensorsWeights``."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]


@dataclass
class ExportSource:
    """What an export reads: a config, tensors by Hugging Face name, and where the tokenizer is."""

    config: dict
    weights: object  # SafetensorsWeights or StateDictWeights
    tokenizer_dir: Path | None  # a directory with tokenizer.json (and tokenizer_config.json)
    tokenizer_gguf: Path | None  # a GGUF whose tokenizer metadata is copied as is
    name: str


def open_source(model: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None) -> ExportSource:
    """A pruned or Hugging Face directory (streamed), or a named default / ``.gguf`` (loaded)."""
    from cfsp.models import NAMED_MODELS, resolve_gguf

    name = str(model)
    path = Path(name).expanduser()
    gguf_tokenizer = _tokenizer_gguf(tokenizer_from) if tokenizer_from is not None else None
    if name in NAMED_MODELS or (path.is_file() and path.suffix == ".gguf"):
        from cfsp.models import load_model

        source_gguf = resolve_gguf(name) if name in NAMED_MODELS else path.resolve()
        _check_gguf_architecture(source_gguf)  # before the minutes a large GGUF takes to load
        loaded, _ = load_model(name, dtype="float32", device="cpu")
        return ExportSource(
            config=loaded.config.to_dict(),
            weights=StateDictWeights(loaded.state_dict()),
            tokenizer_dir=None,
            tokenizer_gguf=gguf_tokenizer or source_gguf,
            name=path.stem if path.suffix == ".gguf" else name,
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        known = ", ".join(NAMED_MODELS)
        raise CfspError(
            f"model {name!r} is not a named default ({known}), a .gguf file or a model directory with config.json"
        )
    from cfsp.weights import SafetensorsWeights

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if gguf_tokenizer is None:
        gguf_tokenizer = _recorded_source_gguf(path)
    return ExportSource(
        config=config,
        weights=SafetensorsWeights(path),
        tokenizer_dir=path if (path / "tokenizer.json").is_file() else None,
        tokenizer_gguf=gguf_tokenizer,
        name=path.resolve().name,
    )


def _check_gguf_architecture(path: Path) -> None:
    """A GGUF source of an architecture the export refuses fails before it is de-quantized."""
    field = gguf_module().GGUFReader(path).fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ("llama", "qwen2"):  # GGUF writes Mistral models as llama
        check_exportable({"model_type": arch})


def _tokenizer_gguf(value: str | os.PathLike) -> Path:
    from cfsp.models import NAMED_MODELS, resolve_gguf

    if str(value) in NAMED_MODELS:
        return resolve_gguf(str(value))
    path = Path(value).expanduser()
    if not path.is_file() or path.suffix != ".gguf":
        raise CfspError(
            f"--tokenizer-from {value}: give a .gguf file or a named default ({', '.join(NAMED_MODELS)})"
        )
    return path.resolve()


def _recorded_source_gguf(folder: Path) -> Path | None:
    """The GGUF a pruned directory was made from, when its plan names one that is still there."""
    from cfsp.models import NAMED_MODELS, resolve_gguf

    try:
        source = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8")).get("source_model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(source, str):
        return None
    if source in NAMED_MODELS:
        try:
            return resolve_gguf(source)
        except CfspError:
            return None
    path = Path(source)
    return path if path.suffix == ".gguf" and path.is_file() else None


# --------------------------------------------------------------------------- hyper-parameters


@dataclass
class DeciShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    widths: list[int]
    vocab: int


def layer_widths_from_config(config: dict) -> list[int]:
    """Per-block FFN widths of a config dict (a pruned directory's ``per_layer_config``, or uniform)."""
    from types import SimpleNamespace

    from cfsp.layouts import layer_widths

    return layer_widths(SimpleNamespace(**config))


def check_exportable(config: dict) -> DeciShape:
    """The shape of a Llama-style model llama.cpp can run with per-layer widths, or a one-line error."""
    kind = config.get("model_type")
    if kind not in EXPORTABLE:
        why = _NOT_EXPORTABLE.get(kind, "llama.cpp runs per-layer FFN widths only for Llama-style blocks")
        raise CfspError(
            f"cannot export a {str(kind).removesuffix('_text')} model to GGUF: {why}. Supported: {', '.join(EXPORTABLE)}; "
            "serve this model with transformers (cfsp eval / cfsp bench) instead"
        )
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CfspError("cannot export to GGUF: llama.cpp's deci architecture rotates every head dimension")
    widths = layer_widths_from_config(config)
    if any(w <= 0 for w in widths):
        raise CfspError(
            "cannot export to GGUF: a block has no FFN channels left, which llama.cpp's deci drops whole"
        )
    theta, rope_type, _ = rope_settings(config)
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise CfspError(
            f"cannot export to GGUF: rope scaling {rope_type!r} has no llama.cpp counterpart in deci"
        )
    window = config.get("sliding_window")
    if kind == "mistral" and window and window < int(config.get("max_position_embeddings", 0)):
        log.warning(
            f"llama.cpp attends to the whole context; the model's {window}-token sliding window only "
            "matters for longer prompts"
        )
    return DeciShape(
        layers=len(widths),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        widths=widths,
        vocab=int(config["vocab_size"]),
    )


def rope_settings(config: dict) -> tuple[float, str, dict]:
    """(base, type, parameters) from transformers 5's ``rope_parameters`` or the older fields."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return theta, rope_type, params


def llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    """Llama-3's per-frequency rope scaling, as the factors llama.cpp divides each frequency by."""
    theta, _, params = rope_settings(config)
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_hyperparameters(writer, config: dict, shape: DeciShape) -> None:
    theta, rope_type, params = rope_settings(config)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(list(shape.widths))
    writer.add_head_count([shape.heads] * shape.layers)
    writer.add_head_count_kv([shape.kv_heads] * shape.layers)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(shape.vocab)
    if rope_type in ("linear", "yarn"):
        gguf = gguf_module()
        kind = gguf.RopeScalingType.LINEAR if rope_type == "linear" else gguf.RopeScalingType.YARN
        writer.add_rope_scaling_type(kind)
        writer.add_rope_scaling_factor(float(params["factor"]))
        if rope_type == "yarn" and "original_max_position_embeddings" in params:
            writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))


# --------------------------------------------------------------------------- tensors


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from half-split (Hugging Face) to interleaved pairs (llama.cpp)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def tensor_plan(weights, config: dict, shape: DeciShape) -> list[tuple[str, str, Callable | None]]:
    """(GGUF name, Hugging Face name, transform) for every tensor the deci loader expects."""
    keys = set(weights.keys())
    plan = []
    for hf_name, gguf_name in _GLOBAL_TENSORS.items():
        if hf_name in keys:
            if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            plan.append((gguf_name, hf_name, None))
    for i in range(shape.layers):
        for hf_part, gguf_part in _BLOCK_TENSORS.items():
            for suffix in ("weight", "bias"):
                hf_name = f"model.layers.{i}.{hf_part}.{suffix}"
                if hf_name not in keys:
                    if suffix == "weight":
                        raise CfspError(f"the weights have no tensor {hf_name!r}; is this a complete model?")
                    continue
                transform = None
                if gguf_part == "attn_q":
                    transform = lambda t: permute_rotary(t, shape.heads)  # noqa: E731
                elif gguf_part == "attn_k":
                    transform = lambda t: permute_rotary(t, shape.kv_heads)  # noqa: E731
                plan.append((f"blk.{i}.{gguf_part}.{suffix}", hf_name, transform))
    unknown = keys - {hf for _, hf, _ in plan} - {"lm_head.weight"}
    unknown = {k for k in unknown if not k.endswith("rotary_emb.inv_freq")}
    if unknown:
        raise CfspError(
            f"cannot export to GGUF: tensors without a llama.cpp counterpart: {', '.join(sorted(unknown)[:4])}"
        )
    return plan


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


# --------------------------------------------------------------------------- tokenizer


def tokenizer_metadata(source: ExportSource, vocab_rows: int) -> dict:
    """The ``tokenizer.*`` keys (name -> GGUFValue), built before anything is written so that a
    tokenizer llama.cpp could not load fails the export up front: copied from the source GGUF, or
    built from ``tokenizer.json``."""
    gguf = gguf_module()
    scratch = gguf.GGUFWriter(None, ARCH)
    if source.tokenizer_gguf is not None:
        _copy_tokenizer(scratch, source.tokenizer_gguf, vocab_rows)
    elif source.tokenizer_dir is not None:
        _tokenizer_from_json(scratch, source.tokenizer_dir, vocab_rows)
    else:
        raise CfspError(
            "the model has no tokenizer (no tokenizer.json); pass --tokenizer-from with the source model's .gguf"
        )
    fields = {k: v for k, v in scratch.kv_data[0].items() if k.startswith("tokenizer.")}
    if fields["tokenizer.ggml.model"].value == "gpt2" and "tokenizer.ggml.merges" not in fields:
        raise CfspError(
            "the tokenizer has no BPE merges, without which llama.cpp cannot load it; pass --tokenizer-from "
            "with the source model's .gguf"
        )
    return fields


def _copy_tokenizer(writer, path: Path, vocab_rows: int) -> None:
    gguf = gguf_module()
    reader = gguf.GGUFReader(path)
    fields = [f for f in reader.fields.values() if f.name.startswith("tokenizer.")]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CfspError(f"{path} carries no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_rows:
        raise CfspError(
            f"the tokenizer of {path} has {len(tokens.data)} tokens but the model {vocab_rows} embedding rows; "
            "pass --tokenizer-from with the model's own .gguf"
        )
    for field in fields:
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub)


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name of the text splitting before BPE, for the splittings recognised here."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    pattern = next((p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"), None)
    if pattern is not None and "\\p{N}{1,3}" in pattern and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
        return "llama-bpe"
    if pattern is not None and "\\p{N}|" in pattern and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
        return "qwen2"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    log.warning(
        "the tokenizer's pre-tokenizer is not one llama.cpp is known to share; it will split text its "
        "default way (token ids given directly are unaffected). Pass --tokenizer-from SOURCE.gguf to copy "
        "the original tokenizer instead"
    )
    return "default"


def _tokenizer_from_json(writer, folder: Path, vocab_rows: int) -> None:
    gguf = gguf_module()
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise CfspError(
            f"cannot write the tokenizer of {folder} to GGUF ({exc}); only byte-level BPE tokenizers are "
            "converted here, pass --tokenizer-from with the source model's .gguf"
        ) from None
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        types.append(int(kind))
    if len(tokens) > vocab_rows:
        raise CfspError(
            f"the tokenizer has {len(tokens)} tokens but the model only {vocab_rows} embedding rows"
        )
    special = {t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    types = [
        int(gguf.TokenType.CONTROL) if tok in special else (int(gguf.TokenType.USER_DEFINED) if t == 3 else t)
        for tok, t in zip(tokens, types, strict=True)
    ]
    for i in range(len(tokens), vocab_rows):  # embedding rows beyond the tokenizer: unused ids
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_rows)
    special_vocab.add_to_gguf(writer, quiet=True)


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

    ``outtype``: f32, f16, bf16 or q8_0 (matrices; norms and biases stay float32). The file is
    written under a reservation like every cfsp output and appears whole or not at all.
    """
    if outtype not in OUTTYPES:
        raise CfspError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    gguf = gguf_module()
    protect = [model] if Path(str(model)).expanduser().exists() else []
    staged = StagedOutput(out, overwrite, protect, own_file=is_cfsp_gguf)
    source = open_source(model, tokenizer_from)
    shape = check_exportable(source.config)
    plan = tensor_plan(source.weights, source.config, shape)
    vocab_rows = source.weights.shape("model.embed_tokens.weight")[0]
    tokenizer = tokenizer_metadata(source, vocab_rows)
    with staged as path:
        writer = gguf.GGUFWriter(path, ARCH)
        _write(writer, source, shape, plan, outtype, tokenizer, progress)
    log.info(f"wrote {out} ({shape.layers} blocks, FFN widths {min(shape.widths)}..{max(shape.widths)})")
    return Path(out)


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
