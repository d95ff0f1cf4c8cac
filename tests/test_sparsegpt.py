"""SparseGPT solver: exact patterns, independent OBS check, error vs magnitude, robustness."""

from __future__ import annotations

import pytest
import torch

from alpsprune import Gram, prune_layer
from alpsprune.errors import SolverError
from alpsprune.masks import pattern_ok, relative_error
from alpsprune.solvers.sparsegpt import _block_prune_counts, solve_sparsegpt
from alpsprune.sparsity import SparsitySpec


def correlated_gram(in_features: int, n: int = 512, seed: int = 0, dead: tuple[int, ...] = ()) -> Gram:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=gen) / in_features**0.5 + torch.eye(in_features)
    X = torch.randn(n, in_features, generator=gen) @ mix
    X[:, list(dead)] = 0.0
    gram = Gram(in_features)
    gram.add_batch(X)
    return gram


def weight(out_features: int, in_features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("shape", "sparsity", "blocksize"),
    [((16, 64), 0.5, 128), ((7, 40), 0.3, 16), ((5, 130), 0.77, 32), ((3, 33), 0.9, 8), ((9, 24), 0.01, 7)],
)
def test_exact_unstructured_count(shape, sparsity, blocksize):
    out_features, in_features = shape
    result = prune_layer(
        weight(*shape),
        correlated_gram(in_features),
        method="sparsegpt",
        sparsity=sparsity,
        blocksize=blocksize,
    )
    assert int(result.mask.sum()) == round((1 - sparsity) * out_features * in_features)
    assert torch.equal(result.weight != 0, result.mask)  # no accidental zeros in random weights


@pytest.mark.parametrize(("structure", "blocksize"), [("2:4", 128), ("4:8", 12), ("1:4", 4), ("3:5", 128)])
def test_nm_pattern(structure, blocksize):
    n_keep, m = map(int, structure.split(":"))
    in_features = m * 10
    result = prune_layer(
        weight(6, in_features),
        correlated_gram(in_features),
        method="sparsegpt",
        mask_structure=structure,
        blocksize=blocksize,
    )
    groups = result.mask.reshape(6, -1, m).sum(-1)
    assert bool((groups == n_keep).all())
    assert pattern_ok(result.mask, SparsitySpec.parse(mask_structure=structure))


def test_block_prune_counts_sum_exactly():
    for total, widths, rows in [(0, [4, 4], 3), (24, [4, 4], 3), (13, [128, 128, 7], 5), (1, [3, 3, 3], 1)]:
        counts = _block_prune_counts(total, widths, rows)
        assert sum(counts) == total
        assert all(0 <= c <= rows * w for c, w in zip(counts, widths, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_shape_device_preserved(dtype):
    W = weight(8, 32).to(dtype)
    gram = correlated_gram(32)
    result = prune_layer(W, gram.G, method="sparsegpt", sparsity=0.6)
    assert result.weight.dtype == dtype
    assert result.weight.shape == W.shape
    assert result.weight.device == W.device
    assert result.mask.dtype == torch.bool and result.mask.shape == W.shape
    assert bool(torch.isfinite(result.weight.float()).all())


def test_matches_independent_obs_one_weight_per_row():
    """Prune exactly one weight per row (column 0, the smallest): SparseGPT == the OBS formula."""
    out_features, in_features = 4, 8
    gram = correlated_gram(in_features, n=256, seed=3)
    W = weight(out_features, in_features, seed=4).abs() + 1.0
    W[:, 0] = 1e-3 * torch.arange(1, out_features + 1)
    sparsity = 1 / in_features  # exactly `out` weights pruned, layer-wide
    result = prune_layer(W, gram, method="sparsegpt", sparsity=sparsity, dampening_frac=0.01)
    assert not bool(result.mask[:, 0].any()) and bool(result.mask[:, 1:].all())

    # independent OBS: prune w_q, δw = −(w_q / [H⁻¹]_qq) · H⁻¹[q, :]
    G = gram.G.to(torch.float64)
    H = G + 0.01 * torch.diagonal(G).mean() * torch.eye(in_features, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    q = 0
    W64 = W.to(torch.float64)
    expected = W64 - (W64[:, q] / Hinv[q, q])[:, None] * Hinv[q, :][None, :]
    assert torch.allclose(expected[:, q], torch.zeros(out_features, dtype=torch.float64), atol=1e-12)
    torch.testing.assert_close(result.weight.to(torch.float64), expected, rtol=1e-4, atol=1e-5)


def test_single_row_obs_chain_matches_sequential_formula():
    """1 row, prune the first two columns: equals two successive OBS steps on the shrinking H."""
    in_features = 6
    gram = correlated_gram(in_features, n=128, seed=5)
    W = torch.tensor([[0.001, 0.002, 1.0, -1.5, 2.0, 0.8]])
    result = prune_layer(W, gram, method="sparsegpt", sparsity=2 / in_features)
    assert result.mask.tolist() == [[False, False, True, True, True, True]]
    G = gram.G.to(torch.float64)
    H = G + 0.01 * torch.diagonal(G).mean() * torch.eye(in_features, dtype=torch.float64)
    w = W[0].to(torch.float64).clone()
    for q in range(2):  # OBS on the sub-problem of the not-yet-processed columns q..end
        Hinv = torch.linalg.inv(H[q:, q:])
        w[q:] -= (w[q] / Hinv[0, 0]) * Hinv[0, :]
    torch.testing.assert_close(result.weight[0].to(torch.float64), w, rtol=1e-4, atol=1e-5)


def strongly_correlated_gram(kind: str, in_features: int, seed: int, n: int = 512) -> Gram:
    gen = torch.Generator().manual_seed(seed)
    if kind == "ar1":  # neighbouring inputs correlated 0.9, like smooth features
        idx = torch.arange(in_features)
        corr = 0.9 ** (idx[:, None] - idx[None, :]).abs().float()
        X = torch.randn(n, in_features, generator=gen) @ torch.linalg.cholesky(corr).T
    else:  # low rank plus noise, like LLM activations
        rank = in_features // 4
        X = torch.randn(n, rank, generator=gen) @ torch.randn(rank, in_features, generator=gen)
        X += 0.3 * torch.randn(n, in_features, generator=gen)
    gram = Gram(in_features)
    gram.add_batch(X)
    return gram


# Note: on a weakly correlated gram (I + noise) with in <= blocksize, SparseGPT (which then picks
# the whole mask up front from w²/U_jj²) can lose slightly to magnitude; the tests use the
# strongly correlated grams where the OBS update is supposed to matter.
@pytest.mark.parametrize("kind", ["ar1", "lowrank"])
@pytest.mark.parametrize("in_features", [96, 256])
@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 0.8])
def test_beats_magnitude_on_correlated_gram(kind, in_features, sparsity):
    W = weight(32, in_features, seed=7)
    gram = strongly_correlated_gram(kind, in_features, seed=8)
    err_sgpt = prune_layer(W, gram, method="sparsegpt", sparsity=sparsity).error
    err_mag = prune_layer(W, gram, method="magnitude", sparsity=sparsity).error
    assert err_sgpt < 0.95 * err_mag


def test_nm_beats_magnitude():
    W = weight(32, 96, seed=9)
    gram = strongly_correlated_gram("ar1", 96, seed=10)
    assert (
        prune_layer(W, gram, method="sparsegpt", mask_structure="2:4").error
        < prune_layer(W, gram, method="magnitude", mask_structure="2:4").error
    )


def test_cholesky_failure_retries_with_more_dampening():
    """Indefinite G (one eigenvalue −0.5, mean diag ≈ 0.8): 0.01 and 0.1 fail, 1.0 works."""
    in_features = 8
    Q, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=torch.Generator().manual_seed(0)))
    eig = torch.ones(in_features, dtype=torch.float64)
    eig[0] = -0.5
    G = (Q.double() * eig) @ Q.double().T
    G = (G + G.T) / 2
    gram = Gram.from_matrix(G)
    result = prune_layer(weight(4, in_features), gram, method="sparsegpt", sparsity=0.5)
    assert result.info["dampening_retries"] == 2
    assert result.info["dampening_frac"] == pytest.approx(1.0)
    assert result.info["lambda"] == pytest.approx(float(torch.diagonal(G).mean()))
    assert bool(torch.isfinite(result.weight).all())
    assert int(result.mask.sum()) == 16


def test_cholesky_failure_raises_when_hopeless():
    G = torch.eye(6, dtype=torch.float64)
    G[2, 2] = -1e6  # mean diag negative: dampening can never make this positive definite
    with pytest.raises(SolverError, match="sparsegpt"):
        prune_layer(weight(3, 6), G, method="sparsegpt", sparsity=0.5)


def test_dead_channels_no_nan_and_pruned_first():
    dead = (0, 5, 6, 31)
    gram = correlated_gram(32, dead=dead)
    W = weight(10, 32) * 10.0  # big weights on dead inputs too
    result = prune_layer(W, gram, method="sparsegpt", sparsity=0.5)
    assert bool(torch.isfinite(result.weight).all())
    assert not bool(result.mask[:, list(dead)].any())  # free to prune: pruned before any live weight
    assert int(result.mask.sum()) == 160
    assert result.info["dead_inputs"] == len(dead)
    nm = prune_layer(W, gram, method="sparsegpt", mask_structure="2:4")
    assert bool(torch.isfinite(nm.weight).all())


def test_all_zero_gram():
    result = prune_layer(weight(4, 16), torch.zeros(16, 16), method="sparsegpt", sparsity=0.5)
    assert bool(torch.isfinite(result.weight).all())
    assert int(result.mask.sum()) == 32
    # dead inputs rank by |w|: the layer-wide largest magnitudes stay, unchanged
    W = weight(4, 16)
    assert torch.equal(result.weight[result.mask], W[result.mask])


def test_factor_cached_on_gram():
    gram = correlated_gram(24)
    before = Gram.chol_count
    for seed in range(3):  # q/k/v sharing one gram
        solve_sparsegpt(weight(5, 24, seed=seed), gram, SparsitySpec.parse(0.5))
    assert Gram.chol_count == before + 1
    solve_sparsegpt(weight(5, 24), gram, SparsitySpec.parse(0.5), dampening_frac=0.1)
    assert Gram.chol_count == before + 2


def test_relative_error_reported_with_undamped_gram():
    W = weight(8, 32)
    gram = correlated_gram(32)
    result = prune_layer(W, gram, method="sparsegpt", sparsity=0.7)
    assert result.error == pytest.approx(relative_error(W, result.weight, gram.G))
    assert 0 < result.error < 1
