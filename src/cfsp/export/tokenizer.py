"""The tokenizer as ``tokenizer.ggml.*`` metadata: copied from a source GGUF, or built from
``tokenizer.json`` (byte-level BPE)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cfsp.errors import CfspError
from cfsp.export.deci import ARCH
from cfsp.export.encoding import gguf_module
from cfsp.export.source import ExportSource

log = logging.getLogger("cfsp")


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
