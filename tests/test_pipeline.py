"""The pipeline's shape: the block pass and its steps, decide -> plan -> apply, the config at the
bottom and the command line generated from it."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model

import cfsp
from cfsp.calibration import BlockStep, run_blocks
from cfsp.config import PruneConfig, flat_option_names
from cfsp.models import decoder_blocks
from cfsp.plan import Plan
from cfsp.statistics import BlockStats, calibrate, pack_symmetric, statistic_steps, unpack_symmetric


def windows(n: int = 16, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))


def test_held_gram_matrices_and_a_second_pass_build_the_same_model_bit_for_bit():
    """The refit solves on the same rounded Gram matrix whether it was held from the one pass or
    collected again just before the block is refit, so the two modes cannot drift apart."""
    models, plans = [], []
    for mode in ("hold", "second-pass"):
        model = make_tiny_model("llama")
        plans.append(cfsp.prune(model, windows(), 0.5, multiple=32, second_moments=mode, progress=False))
        models.append(model)
    assert [p.second_moments for p in plans] == ["held", "second pass"]
    assert [k.tolist() for k in plans[0].kept_channels] == [k.tolist() for k in plans[1].kept_channels]
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_auto_holds_the_gram_matrices_within_the_memory_budget_and_says_so(caplog):
    caplog.set_level("INFO", logger="cfsp")
    held = cfsp.prune(make_tiny_model("llama"), windows(), 0.5, multiple=32, max_memory=1, progress=False)
    assert held.second_moments == "held" and "held from the one calibration pass" in caplog.text
    tight = cfsp.prune(make_tiny_model("llama"), windows(), 0.5, multiple=32, max_memory=1e-6, progress=False)
    assert tight.second_moments == "second pass" and "beyond --max-memory" in caplog.text


def test_packed_gram_matrices_unpack_to_the_float32_rounded_matrix():
    x = torch.randn(64, 24, dtype=torch.float64)
    gram = x.T @ x
    back = unpack_symmetric(pack_symmetric(gram), 24)
    assert torch.equal(back, gram.float().double()) and torch.equal(back, back.T)


def test_a_step_sees_every_batch_and_can_hand_over_new_outputs():
    """The pass offers each block's inputs and outputs to the steps in order, and what a step
    returns from finish is what the next block receives."""
    model = make_tiny_model("llama")
    seen = []

    class Doubling(BlockStep):
        def after_batch(self, run, x_in, x_out):
            seen.append((run.index, x_in.shape[0]))

        def finish(self, run):
            return [2 * y for y in run.outputs] if run.index == 0 else False

    class Inputs(BlockStep):
        def start(self, run):
            self.first = getattr(self, "first", {})
            self.first[run.index] = run.inputs[0].clone()

    inputs = Inputs()
    records = [BlockStats() for _ in decoder_blocks(model)]
    run_blocks(
        model, windows(6), [*statistic_steps(records), Doubling(), inputs], batch_size=4, progress=False
    )
    blocks = len(decoder_blocks(model))
    assert seen == [(i, n) for i in range(blocks) for n in (4, 2)]
    assert all(r.tokens == 6 * 32 for r in records)
    with torch.inference_mode():
        ids = windows(6)[:4]
        hidden = model.model.embed_tokens(ids)
        rotary = model.model.rotary_emb(hidden, torch.arange(32)[None])
        out = decoder_blocks(model)[0](hidden, position_embeddings=rotary, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(inputs.first[1], 2 * out, rtol=1e-4, atol=1e-4)


def test_the_plan_round_trips_through_its_json_with_its_config(tmp_path):
    model = make_tiny_model("llama")
    plan = cfsp.prune(model, windows(), 0.5, multiple=32, second_moments="hold", kv_groups=1, progress=False)
    cfsp.save_pruned(model, None, plan, tmp_path / "out")
    loaded = Plan.load(tmp_path / "out")
    assert loaded.config == plan.config and loaded.widths == plan.widths
    assert all(torch.equal(a, b) for a, b in zip(loaded.kept_channels, plan.kept_channels, strict=True))
    assert [g.tolist() for g in loaded.kept_kv_groups] == [g.tolist() for g in plan.kept_kv_groups]
    assert loaded.extra["architecture"] == "LlamaForCausalLM" and loaded.second_moments == "held"
    assert json.loads(json.dumps(loaded.to_dict()))["options"] == plan.config.to_dict()


def test_plans_of_earlier_versions_read_back_and_unknown_options_are_one_line():
    old = PruneConfig.from_dict(
        dict(b=2.0, c=0.5, channel_metric="three_w_one_wa", reconstruct_epochs=3, kv_groups=0, sparsity=0.3)
    )
    assert (old.weight_activation_exponent, old.activation_exponent) == (2.0, 0.5)
    assert old.channel_metric == "cfsp_paper" and old.reconstruct.epochs == 3 and old.sparsity == 0.3
    with pytest.raises(cfsp.CfspError, match="unknown pruning option.*warp_factor.*another cfsp version"):
        PruneConfig.from_dict(dict(sparsity=0.5, warp_factor=9))


def test_flat_keywords_reach_the_nested_configs():
    config = PruneConfig.from_options(0.4, reconstruct_lr=0.01, drop_attention=1, kv_group_metric="energy")
    assert config.reconstruct.lr == 0.01 and config.attention.drop_attention == 1
    assert config.attention.kv_group_metric == "energy" and config.sparsity == 0.4
    assert config.with_changes(kv_groups=2).attention == type(config.attention)(1, 2, "energy")
    with pytest.raises(cfsp.CfspError, match="reconstruct_holdout must be in"):
        PruneConfig.from_options(reconstruct_holdout=0.9)


def test_every_option_is_a_flag_of_the_command_line_with_the_configs_default():
    import typer.main

    from cfsp.cli import app
    from cfsp.config import field_default, flat_fields

    command = typer.main.get_command(app).commands["prune"]
    params = {p.name: p for p in command.params}
    for name, field, _nested in flat_fields():
        if name == "preset":
            continue  # --reference
        assert name in params, name
        assert str(params[name].default) == str(field_default(field)), name
    assert "--b" in params["weight_activation_exponent"].opts  # the paper's names stay as aliases
    recover = {p.name for p in typer.main.get_command(app).commands["recover"].params}
    from dataclasses import fields

    assert {f.name for f in fields(cfsp.RecoveryConfig)} <= recover


def test_the_command_line_and_the_config_load_without_torch():
    code = "import sys, cfsp.cli, cfsp.config; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_recovery_targets_cover_every_mlp_layout():
    from cfsp.layouts import MLP_LAYOUTS
    from cfsp.recovery.config import DEFAULT_TARGETS

    assert {name for layout in MLP_LAYOUTS for name in layout.names} <= set(DEFAULT_TARGETS)


def test_flat_option_names_are_what_prune_accepts():
    model = make_tiny_model("llama")
    stats = calibrate(model, windows(), progress=False)
    assert "reconstruct_epochs" in flat_option_names() and "reconstruct" not in flat_option_names()
    with pytest.raises(cfsp.CfspError, match="the options are .*reconstruct_epochs"):
        cfsp.prune(model, windows(), 0.5, stats=stats, reconstruct_epoch=1, progress=False)
