"""End to end on the real SmolLM2-135M (LLaMA architecture, 30 blocks, D=1536), small calibration set."""

import copy

import pytest
import torch
from reference_impl import reference_cfsp

import cfsp
from cfsp.evaluation import perplexity

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    try:
        return cfsp.load_model("smollm2")
    except cfsp.CfspError as exc:  # the model package is installed by `make test`
        pytest.skip(str(exc))


def test_smollm2_prune_save_reload_and_reference_match(smollm2, tmp_path):
    dense, tokenizer = smollm2
    model = copy.deepcopy(dense)
    n, length = 8, 256
    calib = cfsp.calibration_windows(tokenizer, n=n, length=length, seed=0)
    dense_ppl = perplexity(dense, tokenizer, seqlen=256, limit=4)["ppl"]

    ref_keep, ref_widths, ref_kept = reference_cfsp(dense, calib, 0.5, multiple=128)
    result = cfsp.prune(model, calib, 0.5, temperature=n * length / 1e4, progress=False)
    assert result.keep_fractions == pytest.approx(ref_keep, abs=1e-6)  # float32 sums vs our float64
    assert result.widths == ref_widths
    mismatched = [
        i
        for i, (a, b) in enumerate(zip(result.kept_channels, ref_kept, strict=True))
        if a.tolist() != b.tolist()
    ]
    assert mismatched == [], f"blocks whose kept channels differ from the reference: {mismatched}"

    assert len(result.widths) == 30 and all(w % 128 == 0 for w in result.widths)
    assert abs(result.realised_sparsity - 0.5) < 0.05
    assert result.params_after < 0.75 * result.params_before

    out = cfsp.save_pruned(model, tokenizer, result, tmp_path / "smollm2-50")
    reloaded, _ = cfsp.load_pruned(out)
    x = calib[:2, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)

    pruned_ppl = perplexity(reloaded, tokenizer, seqlen=256, limit=4)["ppl"]
    assert torch.isfinite(torch.tensor(pruned_ppl))
    assert dense_ppl < pruned_ppl
