"""DSnoT solver: mask refinement of Wanda, weights untouched, counts kept, |ε| reduced."""

from __future__ import annotations

import pytest
import torch

from alpsprune import Gram, prune_layer
from alpsprune.masks import pattern_ok
from alpsprune.solvers.dsnot import row_errors, solve_dsnot
from alpsprune.solvers.wanda import solve_wanda
from alpsprune.sparsity import SparsitySpec


def gram_with_mean(in_features: int, n: int = 512, seed: int = 0, dead: tuple[int, ...] = ()) -> Gram:
    """Inputs with a non-zero, feature-dependent mean (as LLM activations have)."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(in_features, generator=gen)
    scale = torch.rand(in_features, generator=gen) + 0.2
    X = torch.randn(n, in_features, generator=gen) * scale + offset
    X[:, list(dead)] = 0.0
    gram = Gram(in_features)
    gram.add_batch(X)
    return gram


def weight(out_features: int, in_features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


CASES = [
    ((16, 64), {"sparsity": 0.5}),
    ((7, 40), {"sparsity": 0.3}),
    ((13, 96), {"sparsity": 0.77}),
    ((5, 33), {"sparsity": 0.9}),
    ((12, 64), {"mask_structure": "2:4"}),
    ((6, 64), {"mask_structure": "4:8"}),
    ((6, 60), {"mask_structure": "1:3"}),
]


@pytest.mark.parametrize(("shape", "target"), CASES)
def test_counts_values_and_error(shape, target):
    out_features, in_features = shape
    W = weight(*shape)
    gram = gram_with_mean(in_features)
    spec = SparsitySpec.parse(**target)
    _, wanda_mask, _ = solve_wanda(W, gram, spec)
    result = prune_layer(W, gram, method="dsnot", **target)
    mask = result.mask
    assert pattern_ok(mask, spec)
    # per-row counts unchanged (so the exact layer total of the Wanda mask too)
    assert torch.equal(mask.sum(1), wanda_mask.sum(1))
    assert int(mask.sum()) == spec.n_kept(out_features, in_features)
    if spec.is_nm:
        groups = mask.reshape(out_features, -1, spec.m).sum(-1)
        assert torch.equal(groups, wanda_mask.reshape(out_features, -1, spec.m).sum(-1))
    # weights never change value: kept ones equal the dense ones, the rest are zero
    assert torch.equal(result.weight[mask], W[mask])
    assert bool((result.weight[~mask] == 0).all())
    # |ε_i| never grows, and shrinks overall
    eps_wanda = row_errors(W, wanda_mask, gram.mean).abs()
    eps_dsnot = row_errors(W, mask, gram.mean).abs()
    assert bool((eps_dsnot <= eps_wanda + 1e-9).all())
    assert float(eps_dsnot.sum()) < float(eps_wanda.sum())
    assert result.info["swaps"] > 0
    assert 1 <= result.info["cycles"] <= 50
    assert not torch.equal(mask, wanda_mask)


def test_stops_at_threshold_and_max_cycles():
    W = weight(20, 128)
    gram = gram_with_mean(128)
    spec = SparsitySpec.parse(0.6)
    _, wanda_mask, _ = solve_wanda(W, gram, spec)
    W0, mask0, info0 = solve_dsnot(W, gram, spec, max_cycles=0)
    assert torch.equal(mask0, wanda_mask) and info0["swaps"] == 0 and info0["cycles"] == 0
    _, mask1, info1 = solve_dsnot(W, gram, spec, max_cycles=1)
    assert info1["cycles"] == 1 and 0 < info1["swaps"] <= W.shape[0]
    assert int((mask1 != wanda_mask).sum()) == 2 * info1["swaps"]  # one in, one out per swap
    # huge threshold: every row already "good enough", nothing moves
    _, mask_big, info_big = solve_dsnot(W, gram, spec, threshold=1e9)
    assert torch.equal(mask_big, wanda_mask) and info_big["swaps"] == 0
    # rows stop once |ε| < threshold: with a generous threshold, the still-large rows keep going
    _, mask_t, _ = solve_dsnot(W, gram, spec, threshold=0.5, max_cycles=200)
    eps = row_errors(W, mask_t, gram.mean).abs()
    assert float(eps.median()) < 0.5


def test_more_cycles_never_worse():
    W = weight(24, 96, seed=3)
    gram = gram_with_mean(96, seed=4)
    spec = SparsitySpec.parse(0.7)
    totals = []
    for cycles in (0, 1, 5, 50):
        _, mask, _ = solve_dsnot(W, gram, spec, max_cycles=cycles, threshold=0.0)
        totals.append(float(row_errors(W, mask, gram.mean).abs().sum()))
    assert totals == sorted(totals, reverse=True)
    assert totals[-1] < 0.5 * totals[0]


def test_without_mean_is_wanda():
    """A plain G tensor has no input mean: every ε is 0 and DSnoT returns the Wanda mask."""
    W = weight(8, 32)
    G = gram_with_mean(32).G
    dsnot = prune_layer(W, G, method="dsnot", sparsity=0.5)
    wanda = prune_layer(W, G, method="wanda", sparsity=0.5)
    assert torch.equal(dsnot.mask, wanda.mask) and dsnot.info["swaps"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_shape_device_preserved(dtype):
    W = weight(8, 32).to(dtype)
    result = prune_layer(W, gram_with_mean(32), method="dsnot", sparsity=0.5)
    assert (
        result.weight.dtype == dtype and result.weight.shape == W.shape and result.weight.device == W.device
    )
    assert torch.equal(result.weight[result.mask], W[result.mask])


def test_dead_and_constant_channels():
    """Zero inputs (mean 0, var 0) and constant inputs (var 0, mean ≠ 0) give finite results."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=gen) + 0.5
    X[:, [1, 2]] = 0.0
    X[:, [7, 9]] = 1.5
    gram = Gram(32)
    gram.add_batch(X)
    W = weight(6, 32)
    for target in ({"sparsity": 0.5}, {"mask_structure": "2:4"}):
        result = prune_layer(W, gram, method="dsnot", **target)
        assert bool(torch.isfinite(result.weight).all())
        assert torch.equal(result.weight[result.mask], W[result.mask])


def test_vectorised_is_fast():
    import time

    W = weight(512, 1024)
    gram = gram_with_mean(1024, n=2048)
    start = time.perf_counter()
    result = prune_layer(W, gram, method="dsnot", sparsity=0.6)
    assert time.perf_counter() - start < 10.0
    assert result.info["swaps"] > 512
