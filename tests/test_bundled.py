"""The real bundled SmolLM2-135M: ALPS at 50% keeps held-out perplexity far below magnitude pruning's."""

from __future__ import annotations

import pytest
import torch

import alpsprune
from alpsprune.data import get_calibration

BLOCKS = r"layers\.[0-5]\."  # the first 6 of 30 blocks keep the test within about a minute


@pytest.mark.slow
def test_alps_far_better_than_magnitude_on_real_model():
    torch.manual_seed(0)
    model, tok = alpsprune.load_model(None)
    calib = get_calibration("wiki-excerpt", tok, nsamples=8, seqlen=256, seed=0)
    dense_weights = {k: v.clone() for k, v in model.state_dict().items()}

    def ppl() -> float:
        return alpsprune.perplexity(model, tok, "wiki-excerpt", seqlen=256, max_windows=8, progress=False).ppl

    dense = ppl()
    results = {}
    for method in ("magnitude", "alps"):
        model.load_state_dict(dense_weights)
        report = alpsprune.prune_model(
            model, calib, method=method, sparsity=0.5, targets=[BLOCKS], progress=False
        )
        assert report.summary["targeted_sparsity"] == pytest.approx(0.5, abs=1e-6)
        assert len(report.layers) == 42
        results[method] = ppl()
    assert dense < results["alps"] < results["magnitude"]
    # ALPS's perplexity increase is well under half of magnitude pruning's (measured: about 0.3)
    assert results["alps"] - dense < 0.5 * (results["magnitude"] - dense), (dense, results)
