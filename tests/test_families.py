"""Every supported family, from its real published config: prune in memory and streamed, save,
reload, load with stock transformers, evaluate. The README's family table comes from these checks
(``benchmarks/families.py`` runs ``check_family`` and writes the table)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer
from real_models import DEFAULT_CONFIGS, REAL_CONFIGS, gemma4_small_config, make_real_model, shrunk_config

import cfsp
from cfsp import layouts
from cfsp.streaming import load_whole, prune_directory

pytestmark = pytest.mark.families
FAMILIES = REAL_CONFIGS + DEFAULT_CONFIGS


def save_source(name: str, folder: Path, vocab: int | None = None) -> Path:
    """The family's tiny model as a Hugging Face directory (sharded safetensors + tokenizer)."""
    model = make_real_model(name, **({"vocab": vocab} if vocab else {}))
    model.save_pretrained(folder, max_shard_size="200KB")
    make_byte_tokenizer().save_pretrained(folder)
    return folder


STOCK_LOAD = """
import sys, torch
sys.modules["cfsp"] = None  # any import of cfsp would now fail
from transformers import AutoModelForCausalLM
x = torch.load(sys.argv[1])
for folder in sys.argv[2:]:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert "cfsp" not in type(model).__module__.split(".")[0]
        with torch.no_grad():
            torch.save(model(x).logits, folder + ".stock.pt")
    except Exception as exc:
        print(folder, type(exc).__name__, exc, file=sys.stderr)
"""


def check_family(name: str, root: Path, calib: torch.Tensor) -> dict:
    """Prune the family's tiny model at 50 % (cfsp defaults) in memory and streamed; returns what
    held (each a bool) and what was seen. ``stock_load`` is filled in by ``check_stock_loads``."""
    source = save_source(name, root / "source")
    model, tokenizer = cfsp.load_model(source, device="cpu")
    x = calib[:2, :40]
    found = {"mlp": layouts.mlp_layout(model.model.layers[0].mlp).kind, "model_type": model.config.model_type}
    whole, want = load_whole(source, device="cpu").state_dict(), model.state_dict()  # --no-stream's loader
    found["loaded_whole"] = whole.keys() == want.keys() and all(torch.equal(whole[k], want[k]) for k in want)
    # In memory the refit's Gram matrices are held from the one pass; streamed, a second pass
    # collects them: the two must still give the same model bit for bit.
    result = cfsp.prune(model, calib, 0.5, multiple=32, second_moments="hold", progress=False)
    assert result.second_moments == "held"
    with torch.no_grad():
        logits = model(x).logits
    found["pruned"] = result.params_after < result.params_before and bool(torch.isfinite(logits).all())
    cfsp.save_pruned(model, tokenizer, result, root / "in-memory")
    streamed = prune_directory(
        source, calib, 0.5, root / "streamed", device="cpu", multiple=32, progress=False
    )
    same_channels = [k.tolist() for k in streamed.kept_channels] == [k.tolist() for k in result.kept_channels]
    same_logits = []
    for folder in ("in-memory", "streamed"):
        reloaded, _ = cfsp.load_pruned(root / folder, device="cpu")
        with torch.no_grad():
            same_logits.append(torch.equal(reloaded(x).logits, logits))
    found["streamed"] = same_channels and same_logits[1]
    found["reload"] = same_logits[0]
    torch.save(logits, root / "expected.pt")
    scores = cfsp.evaluate(reloaded, tokenizer, tasks=["wikitext2"], limit=1, seqlen=32)
    found["eval"] = math.isfinite(scores["results"]["wikitext2"]["ppl"])
    found["widths"] = result.widths
    found["uniform_stock"] = check_uniform_stock(name, root, calib, x)
    return found


def check_uniform_stock(name: str, root: Path, calib: torch.Tensor, x: torch.Tensor) -> bool:
    """``uniform=True`` writes the family's stock checkpoint: plain transformers loads it, without
    remote code, to the same logits."""
    from transformers import AutoModelForCausalLM

    model = make_real_model(name)
    result = cfsp.prune(model, calib, 0.5, multiple=32, uniform=True, progress=False)
    cfsp.save_pruned(model, None, result, root / "uniform")
    if (root / "uniform" / "modeling_cfsp.py").exists():
        return False
    stock = AutoModelForCausalLM.from_pretrained(root / "uniform")
    with torch.no_grad():
        return type(stock).__module__.startswith("transformers.") and torch.equal(
            stock(x).logits, model(x).logits
        )


def check_stock_loads(roots: list[Path], x: torch.Tensor) -> tuple[list[bool], str]:
    """Load every pruned directory with stock transformers (trust_remote_code, cfsp not importable),
    all in one fresh process; True where the logits equal cfsp's."""
    torch.save(x, roots[0] / "x.pt")
    folders = [str(root / "streamed") for root in roots]
    done = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(roots[0] / "x.pt"), *folders],
        capture_output=True,
        text=True,
        timeout=600,
    )
    same = []
    for root, folder in zip(roots, folders, strict=True):
        stock = Path(folder + ".stock.pt")
        same.append(stock.is_file() and torch.equal(torch.load(stock), torch.load(root / "expected.pt")))
    return same, done.stderr


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    """Every family checked once; the stock loads share one process."""
    from conftest import VOCAB

    calib = torch.randint(4, VOCAB, (16, 64), generator=torch.Generator().manual_seed(0))
    torch.set_num_threads(1)
    roots = {name: tmp_path_factory.mktemp(name) for name in FAMILIES}
    found = {name: check_family(name, roots[name], calib) for name in FAMILIES}
    same, errors = check_stock_loads(list(roots.values()), calib[:2, :40])
    for name, ok in zip(FAMILIES, same, strict=True):
        found[name]["stock_load"] = ok
        found[name]["stock_error"] = [line for line in errors.splitlines() if name in line]
    return found


@pytest.mark.parametrize("name", FAMILIES)
def test_family_prunes_streams_saves_and_loads(name, checked):
    found = checked[name]
    assert found["pruned"]
    assert found["streamed"], "streamed pruning differs from in-memory pruning"
    assert found["reload"], "cfsp.load_pruned gives different logits"
    assert found["loaded_whole"], "--no-stream's tensor-by-tensor load differs from from_pretrained"
    assert found["stock_load"], found["stock_error"]
    assert found["eval"]
    assert found["uniform_stock"], "the uniform output is not the stock checkpoint"


def test_fixtures_keep_the_real_ids_beyond_the_vocabulary():
    """The pad id near the top of the vocabulary is what crashed streaming; the fixtures keep it."""
    assert shrunk_config("glm-4-9b-0414").pad_token_id == 509  # 151329 of 151552 in the real model
    assert shrunk_config("phi-4-mini-instruct").pad_token_id == 511
    assert shrunk_config("smollm3-3b").pad_token_id == 510


def test_fused_and_plain_layouts_prune_with_every_method(calib):
    for name in ("phi-4-mini-instruct", "starcoder2-3b"):
        for method in ("cfsp", "wanda-sp", "flap", "magnitude-sp"):
            model = make_real_model(name)
            result = cfsp.prune(model, calib, 0.5, method=method, progress=False)
            assert cfsp.models.ffn_widths(model) == result.widths
            with torch.no_grad():
                assert torch.isfinite(model(calib[:1, :16]).logits).all()


def test_fused_slicing_keeps_each_channel_whole(calib):
    """A fused gate_up matrix loses the gate row and the up row of each pruned channel together:
    with all but the pruned channels' rows unchanged, the pruned MLP equals the dense MLP
    with those channels' down columns zeroed."""
    from cfsp.surgery import slice_mlp

    model = make_real_model("phi-4-mini-instruct")
    mlp = model.model.layers[0].mlp
    h = torch.randn(3, 64)
    kept = torch.arange(0, 256, 2)
    with torch.no_grad():
        down = mlp.down_proj.weight.clone()
        mask = torch.zeros(256)
        mask[kept] = 1
        mlp.down_proj.weight.mul_(mask)
        expected = mlp(h)
        mlp.down_proj.weight.copy_(down)
        slice_mlp(mlp, kept)
        assert mlp.gate_up_proj.weight.shape == (256, 64) and mlp.down_proj.weight.shape == (64, 128)
        torch.testing.assert_close(mlp(h), expected, rtol=1e-5, atol=1e-6)


def test_qwen2_streams_at_its_real_vocabulary_size(calib, tmp_path):
    """Qwen2.5 at its real vocabulary (151,936) with the pad id its tokenizer uses (151,643), far
    outside the rows the calibration windows use: streamed == in memory."""
    name = "qwen2.5-1.5b-instruct"
    config = shrunk_config(name, vocab=151936)
    assert config.bos_token_id == 151643 and config.eos_token_id == 151645  # the real ids, kept
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config.pad_token_id = 151643
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    source = tmp_path / "qwen"
    model.save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    expected = cfsp.prune(model, calib, 0.5, multiple=32, progress=False)
    result = prune_directory(source, calib, 0.5, tmp_path / "out", device="cpu", multiple=32, progress=False)
    assert [k.tolist() for k in result.kept_channels] == [k.tolist() for k in expected.kept_channels]
    reloaded, _ = cfsp.load_pruned(tmp_path / "out", device="cpu")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == 151643
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, model(calib[:2]).logits)


def test_gemma4_keeps_its_own_per_layer_config(calib, tmp_path):
    """Gemma 4 has per_layer_config of its own (a larger head_dim on global layers): a dense
    directory loads as a dense model, and pruning adds the widths beside the head sizes."""
    source = save_source("gemma-4-31b-it", tmp_path / "gemma4")
    assert "per_layer_config" in json.loads((source / "config.json").read_text())
    model, _ = cfsp.load_model(source, device="cpu")
    result = cfsp.prune(model, calib, 0.5, multiple=32, progress=False)
    cfsp.save_pruned(model, None, result, tmp_path / "out")
    per_layer = json.loads((tmp_path / "out" / "config.json").read_text())["per_layer_config"]
    global_layer = model.config.layer_types.index("full_attention")
    assert per_layer[str(global_layer)]["head_dim"] == 32
    assert [per_layer.get(str(i), {}).get("intermediate_size", 256) for i in range(6)] == result.widths


def test_mixture_of_experts_is_one_line(calib):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=300,
        shared_expert_intermediate_size=32,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(cfsp.CfspError, match="mixture-of-experts"):
        cfsp.prune(model, calib, 0.5, progress=False)


def test_gemma4_kv_shared_layers_and_double_wide_mlps(calib, tmp_path):
    """Gemma 4's small models share K/V from earlier layers and double the FFN of the sharing
    layers: block-by-block calibration keeps the sharing, allocation meets the sparsity over
    unequal widths, and streamed == in memory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gemma4_small_config(), dtype=torch.float32).eval()
    assert cfsp.models.ffn_widths(model) == [256] * 4 + [512] * 4
    model.save_pretrained(tmp_path / "source")
    expected = cfsp.prune(model, calib, 0.5, multiple=32, progress=False)
    assert abs(expected.realised_sparsity - 0.5) <= 16 / 3072
    result = prune_directory(
        tmp_path / "source", calib, 0.5, tmp_path / "out", device="cpu", multiple=32, progress=False
    )
    assert [k.tolist() for k in result.kept_channels] == [k.tolist() for k in expected.kept_channels]
    reloaded, _ = cfsp.load_pruned(tmp_path / "out", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, model(calib[:2]).logits)


@pytest.mark.parametrize("name", ["phi-4-mini-instruct", "starcoder2-3b"])
@pytest.mark.parametrize("train", ["lora", "mlp"])
def test_recovery_trains_fused_and_plain_mlps(name, train, calib, tmp_path):
    """IG-LoRA finds the family's own projections (Phi's qkv_proj and gate_up_proj, Starcoder2's
    c_fc / c_proj); both kinds of training lower the loss and keep the pruned widths."""
    from cfsp.recovery import RecoveryConfig, load_recovery_data, recover

    model = make_real_model(name)
    pruned = cfsp.prune(model, calib, 0.5, multiple=32, progress=False)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran to the log. " * 40, encoding="utf-8")
    dataset = load_recovery_data(text, make_byte_tokenizer(), seqlen=32)
    settings = dict(steps=6, lr=1e-2, batch_size=4, grad_accum=1, seqlen=32, logging_steps=1, save_steps=100)
    settings["train"] = train
    result = recover(model, make_byte_tokenizer(), dataset, pruned.block_importance, RecoveryConfig(**settings),
                     tmp_path / "run")  # fmt: skip
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert cfsp.models.ffn_widths(result.model) == pruned.widths
    if train == "lora":
        assert result.trainable_params > 0 and len(result.ranks) == len(pruned.widths)


def test_command_line_prunes_and_evaluates_a_real_config_directory(tmp_path):
    """``cfsp prune --model DIR`` (streamed by default) on GLM-4, whose pad id sits at the top of
    its vocabulary, then ``cfsp eval`` on the output."""
    from typer.testing import CliRunner

    from cfsp.cli import app

    source = save_source("glm-4-9b-0414", tmp_path / "glm4")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence number {i} for calibration" for i in range(300)))
    runner = CliRunner()
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(source), "--calib-source", str(corpus), "--nsamples", "8"]
    done = runner.invoke(app, [*args, "--seqlen", "64", "--multiple", "32", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert cfsp.read_plan(out)["architecture"] == "Glm4ForCausalLM"
    report = tmp_path / "eval.json"
    done = runner.invoke(app, ["eval", str(out), "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32",
                               "--output", str(report)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert math.isfinite(json.loads(report.read_text())["results"]["wikitext2"]["ppl"])


@pytest.mark.parametrize("name", ["phi-4-mini-instruct", "starcoder2-3b", "qwen3.5-0.8b"])
@pytest.mark.parametrize(
    "options",
    [
        dict(method="flap"),
        dict(method="magnitude-sp"),
        dict(method="wanda-sp", compensation="refit"),
        dict(compensation="none"),
        dict(sequential=True, compensation="refit"),
    ],
)
def test_fused_plain_and_hybrid_stream_like_in_memory_with_every_method(name, options, calib, tmp_path):
    source = save_source(name, tmp_path / "source")
    model, _ = cfsp.load_model(source, device="cpu")
    expected = cfsp.prune(model, calib, 0.5, multiple=32, progress=False, **options)
    result = prune_directory(source, calib, 0.5, tmp_path / "out", device="cpu", multiple=32, progress=False,
                             **options)  # fmt: skip
    assert [k.tolist() for k in result.kept_channels] == [k.tolist() for k in expected.kept_channels]
    reloaded, _ = cfsp.load_pruned(tmp_path / "out", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, model(calib[:2]).logits)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_reconstruction_on_real_configs_trains_only_the_mlps(name, calib):
    """Every published layout (fused gate/up, plain MLPs, post-MLP norms, per-layer settings):
    reconstruction never ends above where it started and leaves everything outside the MLPs as it was."""
    model = make_real_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".mlp." not in k}
    result = cfsp.prune(
        model, calib, 0.5, compensation="reconstruct", reconstruct_epochs=1, multiple=32, progress=False
    )
    assert result.reconstruction, "no block was reconstructed"
    for r in result.reconstruction:
        watched = "heldout" if r["heldout_before"] is not None else "loss"
        assert r[f"{watched}_after"] <= r[f"{watched}_before"]
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    with torch.no_grad():
        assert torch.isfinite(model(calib[:2]).logits).all()
