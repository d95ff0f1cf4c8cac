"""ALPS solver: SPEC §2 properties, checked against independent computations."""

from __future__ import annotations

import pytest
import torch

import alpsprune
from alpsprune.masks import mask_for
from alpsprune.solvers.alps import alps_rhs, pcg_refit, symmetric_product
from alpsprune.solvers.base import dense_target_weight
from alpsprune.sparsity import SparsitySpec
from alpsprune.stats import Gram


def correlated_gram(d: int, seed: int, n: int = 1024, factors: int = 16, noise: float = 0.5) -> torch.Tensor:
    """``XᵀX`` for inputs with strongly correlated features (a few shared factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, factors, generator=g)
    A = torch.randn(factors, d, generator=g)
    scale = torch.rand(d, generator=g) * 2 + 0.1
    X = (Z @ A + noise * torch.randn(n, d, generator=g)) * scale
    return X.T @ X


def exact_refit(W_hat: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Independent least-squares refit on a fixed support: per row, solve H_SS w_S = (H Ŵᵀ)_S."""
    G = G.double()
    H = G + damp * torch.diagonal(G).mean() * torch.eye(G.shape[0], dtype=torch.float64)
    W = torch.zeros_like(W_hat, dtype=torch.float64)
    rhs = W_hat.double() @ H
    for i in range(W_hat.shape[0]):
        S = mask[i].nonzero().squeeze(1)
        if S.numel():
            W[i, S] = torch.linalg.solve(H[S][:, S], rhs[i, S])
    return W


def test_identity_gram_keeps_weights_and_is_near_magnitude():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    mag = alpsprune.prune_layer(W, torch.eye(128), method="magnitude", sparsity=0.7)
    res = alpsprune.prune_layer(W, torch.eye(128), method="alps", sparsity=0.7)
    assert torch.allclose(res.weight[res.mask], W[res.mask], atol=1e-5)
    assert res.error <= mag.error * 1.02
    assert res.error >= mag.error * (1 - 1e-9)  # magnitude is optimal for G = I


def test_safeguard_never_worse_than_warm_start():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    mag = alpsprune.prune_layer(W, torch.eye(128), method="magnitude", sparsity=0.7)
    res = alpsprune.prune_layer(W, torch.eye(128), method="alps", sparsity=0.7, support_safeguard=True)
    assert res.error == pytest.approx(mag.error, rel=1e-6)
    assert "safeguard_used_warm_start" in res.info


def test_pcg_matches_exact_least_squares_on_support():
    G = correlated_gram(96, seed=1)
    W_hat = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    gram = Gram.from_matrix(G)
    eig = gram.scaled_eig(0.01)
    spec = SparsitySpec.parse(0.6)
    C = alps_rhs(W_hat, gram, 0.01, torch.float64)
    B0 = W_hat.double() * eig.e
    mask = mask_for(B0.abs(), spec)
    X = pcg_refit(B0, C, eig.Hn, mask, steps=300)
    W_pcg = X / eig.e
    W_ref = exact_refit(W_hat, G, mask)
    assert torch.allclose(W_pcg, W_ref, rtol=1e-6, atol=1e-8 * W_ref.abs().max())
    # and the default 10 steps already land close in objective (what the solver ships)
    X10 = pcg_refit(B0, C, eig.Hn, mask, steps=10)
    err10 = alpsprune.relative_error(W_hat, X10 / eig.e, G)
    err_ref = alpsprune.relative_error(W_hat, W_ref, G)
    assert err10 <= err_ref * 1.05


def test_alps_output_is_refit_of_its_support():
    G = correlated_gram(64, seed=3)
    W_hat = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    res = alpsprune.prune_layer(W_hat, G, method="alps", sparsity=0.7, pcg_steps=200, precision="float64")
    W_ref = exact_refit(W_hat, G, res.mask)
    assert torch.allclose(res.weight.double(), W_ref, rtol=1e-4, atol=1e-6 * W_ref.abs().max())


@pytest.mark.parametrize("sparsity", [0.7, 0.8])
def test_alps_beats_sparsegpt_beats_magnitude_on_correlated_grams(sparsity):
    for seed in range(3):
        G = correlated_gram(128, seed=seed)
        W = torch.randn(64, 128, generator=torch.Generator().manual_seed(100 + seed))
        err = {
            m: alpsprune.prune_layer(W, G, method=m, sparsity=sparsity).error
            for m in ("alps", "sparsegpt", "magnitude")
        }
        assert err["alps"] < err["sparsegpt"] < err["magnitude"], (seed, err)


def test_float32_path_matches_float64_path():
    """The fast float32 ADMM/PCG path agrees with the plain float64 one (objective within 0.5%)."""
    G = correlated_gram(128, seed=5)
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(6))
    for pattern in ({"sparsity": 0.7}, {"mask_structure": "2:4"}):
        e32 = alpsprune.prune_layer(W, G, method="alps", precision="float32", **pattern).error
        e64 = alpsprune.prune_layer(W, G, method="alps", precision="float64", **pattern).error
        assert abs(e32 - e64) <= 0.005 * e64


def test_w_update_modes_agree():
    G = correlated_gram(64, seed=7)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(8))
    a = alpsprune.prune_layer(W, G, method="alps", sparsity=0.6, w_update="eig", precision="float64")
    b = alpsprune.prune_layer(W, G, method="alps", sparsity=0.6, w_update="inverse", precision="float64")
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_dense_target_with_identical_inputs_reduces_to_plain_alps():
    """Cross term X̃ᵀX with X̃ = X is the standard problem: same support and weights."""
    g = torch.Generator().manual_seed(9)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    W = torch.randn(32, 64, generator=g)
    plain = Gram(64)
    plain.add_batch(X)
    dense_target = Gram(64)
    dense_target.add_batch(X, dense_x=X)
    a = alpsprune.prune_layer(W, plain, method="alps", sparsity=0.7, precision="float64")
    b = alpsprune.prune_layer(W, dense_target, method="alps", sparsity=0.7, precision="float64")
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.weight, b.weight, rtol=1e-6, atol=1e-7)


def _dense_target_grams(seed: int, n: int = 64):
    """(plain gram of X̃, gram of X̃ carrying the cross term X̃ᵀX) for pruned inputs X̃ ≠ dense X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, n, generator=g) @ torch.randn(n, n, generator=g)
    X_pruned = X + 0.3 * torch.randn(512, n, generator=g)
    plain, cross = Gram(n), Gram(n)
    plain.add_batch(X_pruned)
    cross.add_batch(X_pruned, dense_x=X)
    return X, X_pruned, plain, cross


def test_dense_target_reduction_equals_least_squares_and_native_alps():
    """Non-native solvers get W* = Ŵ(XᵀX̃+λI)(X̃ᵀX̃+λI)⁻¹; at 0% sparsity that is the damped LS fit,
    and it poses the same quadratic as ALPS's native cross-gram route."""
    X, X_pruned, plain, cross = _dense_target_grams(11)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(12))
    lam = 0.01 * float(torch.diagonal(plain.G).mean())
    Xd, Xp = X.double(), X_pruned.double()
    H = Xp.T @ Xp + lam * torch.eye(64, dtype=torch.float64)
    expected = torch.linalg.solve(H, Xp.T @ Xd @ W.double().T + lam * W.double().T).T
    dense = alpsprune.prune_layer(W, cross, method="sparsegpt", sparsity=0.0)
    assert torch.allclose(dense.weight.double(), expected, rtol=1e-4, atol=1e-4)

    # ALPS's linear term from the cross gram equals the one from W* with the plain gram (only ADMM's
    # warm start differs: Ŵ natively, W* through the reduction)
    W_star = dense_target_weight(W, cross, 0.01)
    C_native = alps_rhs(W, cross, 0.01, torch.float64)
    C_reduced = alps_rhs(W_star, plain, 0.01, torch.float64)
    assert torch.allclose(C_native, C_reduced, rtol=1e-5, atol=1e-6 * float(C_native.abs().max()))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "dsnot"])
def test_dense_target_with_identical_inputs_is_plain_for_every_solver(method):
    X, _, _, _ = _dense_target_grams(13)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(14))
    plain, cross = Gram(64), Gram(64)
    plain.add_batch(X)
    cross.add_batch(X, dense_x=X)
    a = alpsprune.prune_layer(W, plain, method=method, sparsity=0.6)
    b = alpsprune.prune_layer(W, cross, method=method, sparsity=0.6)
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5)


def test_sparsegpt_dense_target_lowers_the_dense_output_error():
    X, X_pruned, plain, cross = _dense_target_grams(15)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(16))

    def dense_output_error(Wp: torch.Tensor) -> float:
        return float(((X_pruned @ Wp.T - X @ W.T) ** 2).sum())

    for sparsity in (0.2, 0.6):
        standard = alpsprune.prune_layer(W, plain, method="sparsegpt", sparsity=sparsity)
        corrected = alpsprune.prune_layer(W, cross, method="sparsegpt", sparsity=sparsity)
        assert dense_output_error(corrected.weight) < dense_output_error(standard.weight)


def test_shared_gram_factorises_once():
    G = correlated_gram(64, seed=10)
    gram = Gram.from_matrix(G)
    before = Gram.eig_count
    for seed in range(3):  # q, k, v
        W = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
        alpsprune.prune_layer(W, gram, method="alps", sparsity=0.5)
    assert Gram.eig_count - before == 1


def test_info_reports_schedule():
    G = correlated_gram(64, seed=11)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(12))
    res = alpsprune.prune_layer(W, G, method="alps", sparsity=0.8, max_iter=300)
    info = res.info
    assert 3 <= info["iterations"] <= 300 and info["final_rho"] > 0 and info["restarts"] >= 0
    assert info["stop_reason"] in {"support_stable", "support_nearly_stable", "max_iter"}
    capped = alpsprune.prune_layer(W, G, method="alps", sparsity=0.8, max_iter=6)
    assert capped.info["iterations"] == 6 and capped.info["stop_reason"] == "max_iter"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [5, 383, 577, 1100])
def test_symmetric_product_equals_full_product(n, dtype):
    """The blocked ``M Mᵀ`` used to re-form ``(Hn + ρI)⁻¹`` matches the plain product and is symmetric.

    Bitwise symmetry is a property of the construction (one triangle mirrored), so it holds for every
    BLAS kernel; the comparison with the plain GEMM (another code path) carries a rounding tolerance.
    """
    M = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(dtype)
    P = symmetric_product(M)
    assert torch.equal(P, P.T)
    tol = {"rtol": 1e-12, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-3}
    torch.testing.assert_close(P, M @ M.T, **tol)


def test_dense_target_reduction_in_row_slabs_equals_one_solve(monkeypatch):
    """The reduction a slab of rows at a time (uneven slabs of 5 rows) gives the one-shot float64 solve's
    W* to float64 rounding before the final float32 cast: at most one float32 ulp apart."""
    from alpsprune import masks

    _, _, _, cross = _dense_target_grams(15)
    W = torch.randn(23, 64, generator=torch.Generator().manual_seed(16))
    H, lam = cross.damped(0.01)
    factor = torch.linalg.cholesky(H)
    rhs = W.double() @ cross.cross.T + lam * W.double()
    whole = torch.cholesky_solve(rhs.T, factor).T
    monkeypatch.setattr(masks, "ROW_SLAB_ELEMENTS", 5 * 64)
    W_star = dense_target_weight(W, cross, 0.01)
    assert W_star.dtype == torch.float32
    ulp = torch.finfo(torch.float32).eps * whole.abs()
    assert bool(((W_star.double() - whole).abs() <= ulp).all())
