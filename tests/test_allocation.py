"""Non-uniform sparsity allocation (issue 9): exact overall budget, bounds, OWL and error-curve maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

import alpsprune
from alpsprune.allocation import (
    Curve,
    allocate,
    counts_to_sparsities,
    default_bounds,
    integer_counts,
    lagrangian_allocation,
    outlier_ratio,
    owl_block_sparsities,
    uniform_kept,
)
from alpsprune.errors import AlpsPruneError
from alpsprune.models import get_weight, list_target_layers
from alpsprune.sparsity import SparsitySpec


def calibration(model, n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed)
    )


def kept_counts(model, alloc: dict[str, float]) -> tuple[int, int]:
    """(kept by the allocation as the pipeline rounds it, kept by the uniform allocation)."""
    layers = list_target_layers(model)
    assert sorted(alloc) == sorted(layers)
    kept = sum(SparsitySpec.parse(alloc[n]).n_kept(*get_weight(m).shape) for n, m in layers.items())
    return kept, sum(get_weight(m).numel() for m in layers.values())


# ---- pure maths ----------------------------------------------------------------------------------


def test_default_bounds():
    assert default_bounds(0.7) == pytest.approx((0.5, 0.9))
    assert default_bounds(0.1) == pytest.approx((0.0, 0.3))
    assert default_bounds(0.9) == pytest.approx((0.7, 0.95))
    assert default_bounds(0.97)[1] == pytest.approx(0.97)  # never excludes s itself
    with pytest.raises(AlpsPruneError):
        default_bounds(0.5, min_sparsity=0.6)


@pytest.mark.parametrize("seed", range(5))
def test_integer_counts_exact_and_bounded(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(50, 5000, size=20)
    s, lo, hi = 0.63, 0.45, 0.8
    targets = sizes * (1 - rng.uniform(lo, hi, size=20))
    total = uniform_kept(sizes, s)
    k = integer_counts(targets, sizes, total, lo, hi)
    assert int(k.sum()) == total
    sp = counts_to_sparsities(k, sizes)
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in sp)
    assert [round((1 - v) * n) for v, n in zip(sp, sizes)] == k.tolist()  # the pipeline's rounding
    assert abs(total - round((1 - s) * sizes.sum())) <= len(sizes)


def test_owl_more_outliers_lower_sparsity():
    ratios = [0.010, 0.050, 0.020, 0.030]
    sizes = [1000] * 4
    s = owl_block_sparsities(ratios, sizes, 0.7, lam=0.08)
    assert np.argsort(s).tolist() == np.argsort(ratios)[::-1].tolist()
    assert max(s) - min(s) == pytest.approx(0.16)  # spread 2λ
    assert np.mean(s) == pytest.approx(0.7)
    assert owl_block_sparsities([0.02] * 3, [10] * 3, 0.6) == pytest.approx([0.6] * 3)


def test_owl_weighted_mean_and_clipping():
    ratios, sizes = [0.0, 0.1, 0.5, 0.2], [100, 400, 50, 300]
    s = np.array(owl_block_sparsities(ratios, sizes, 0.5, lam=0.3, bounds=(0.4, 0.6)))
    assert (s >= 0.4 - 1e-12).all() and (s <= 0.6 + 1e-12).all()
    assert float((s * sizes).sum() / sum(sizes)) == pytest.approx(0.5, abs=1e-9)
    assert s[2] == pytest.approx(0.4)  # most outliers: at the lower bound


def test_outlier_ratio():
    scores = torch.ones(1000)
    scores[:7] = 100.0  # mean ≈ 1.69, threshold ≈ 8.5
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.007)


def test_lagrangian_steeper_curve_gets_lower_sparsity():
    grid = np.linspace(0.5, 0.9, 5)
    slopes = [2.0, 4.0, 8.0, 4.0]
    curves = [Curve(grid, 0.01 * np.exp(b * (grid - 0.5))) for b in slopes]
    sizes = [10_000, 10_000, 10_000, 7_777]
    s = lagrangian_allocation(curves, sizes, 0.7, bounds=(0.5, 0.9))
    assert s[0] > s[1] > s[2]
    assert sum(SparsitySpec.parse(v).n_kept(1, n) for v, n in zip(s, sizes)) == uniform_kept(sizes, 0.7)
    assert all(0.5 <= v <= 0.9 for v in s)
    # the optimum beats (or ties) uniform on the objective
    obj = sum(c(np.array([v]))[0] for c, v in zip(curves, s))
    assert obj <= sum(c(np.array([0.7]))[0] for c in curves) + 1e-12


def test_lagrangian_identical_curves_stay_near_uniform():
    grid = np.linspace(0.4, 0.8, 5)
    curves = [Curve(grid, 0.02 * np.exp(5 * (grid - 0.4)))] * 6
    sizes = [3000] * 6
    s = lagrangian_allocation(curves, sizes, 0.6, bounds=(0.4, 0.8))
    assert max(s) - min(s) < 0.01
    assert sum(round((1 - v) * n) for v, n in zip(s, sizes)) == uniform_kept(sizes, 0.6)


# ---- on a tiny model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model("llama")
    return model, calibration(model)


@pytest.mark.parametrize("mode", ["owl", "curve", "uniform"])
def test_allocation_exact_and_bounded(tiny, mode):
    model, calib = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alloc = allocate(mode, model, calib, 0.6, progress=False)
    kept, total = kept_counts(model, alloc)
    uniform = sum(round(0.4 * get_weight(m).numel()) for m in list_target_layers(model).values())
    assert kept == uniform
    assert abs(kept - round(0.4 * total)) <= len(alloc)
    assert all(0.4 - 1e-12 <= v <= 0.8 + 1e-12 for v in alloc.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    if mode == "owl":  # one sparsity per block (up to the integer rounding of the counts)
        for b in range(3):
            values = [v for n, v in alloc.items() if f"layers.{b}." in n]
            assert max(values) - min(values) < 1e-3
    if mode != "uniform":
        assert len({round(v, 3) for v in alloc.values()}) > 1


def test_allocation_custom_bounds_and_errors(tiny):
    model, calib = tiny
    alloc = allocate(
        "curve", model, calib, 0.5, method="sparsegpt", min_sparsity=0.45, max_sparsity=0.55, progress=False
    )
    assert all(0.45 - 1e-12 <= v <= 0.55 + 1e-12 for v in alloc.values())
    assert kept_counts(model, alloc)[0] == sum(
        round(0.5 * get_weight(m).numel()) for m in list_target_layers(model).values()
    )
    with pytest.raises(AlpsPruneError, match="mode"):
        allocate("best", model, calib, 0.5)
    with pytest.raises(AlpsPruneError, match="bounds"):
        allocate("owl", model, calib, 0.5, max_sparsity=0.4)
    only_mlp = allocate("owl", model, calib, 0.5, targets=r".*mlp.*", progress=False)
    assert all(".mlp." in n for n in only_mlp) and len(only_mlp) == 9


def test_prune_model_with_owl_allocation(tiny):
    _, calib = tiny
    model = make_tiny_model("llama")
    alloc = allocate("owl", model, calib, 0.6, progress=False)
    report = alpsprune.prune_model(model, calib, sparsity=0.6, allocation=alloc, progress=False)
    assert sorted(r.name for r in report.layers) == sorted(alloc)
    layers = list_target_layers(model)
    kept = 0
    for r in report.layers:
        spec = SparsitySpec.parse(alloc[r.name])
        assert r.pattern == spec.label
        nnz = int((get_weight(layers[r.name]) != 0).sum())
        assert nnz <= spec.n_kept(*r.shape)
        kept += spec.n_kept(*r.shape)
    total = sum(r.shape[0] * r.shape[1] for r in report.layers)
    assert abs(kept - round(0.4 * total)) <= len(report.layers)
