"""Contract of every solver behind `alpsprune.prune_layer`: patterns, dtypes, ties, robustness, errors."""

from __future__ import annotations

import pytest
import torch

import alpsprune
from alpsprune.masks import pattern_ok, topk_mask
from alpsprune.solvers import SOLVERS
from alpsprune.sparsity import SparsitySpec

METHODS = ["magnitude", "wanda", "sparsegpt", "dsnot", "alps"]
PATTERNS = [{"sparsity": 0.5}, {"sparsity": 0.77}, {"mask_structure": "2:4"}, {"mask_structure": "1:8"}]


def random_layer(out_f: int = 24, in_f: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    X += 0.2 * torch.randn(256, in_f, generator=g)
    return torch.randn(out_f, in_f, generator=g), X.T @ X


def test_all_methods_registered():
    assert set(METHODS) <= set(SOLVERS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: str(next(iter(p.values()))))
def test_exact_pattern_and_zeros(method, pattern):
    W, G = random_layer()
    res = alpsprune.prune_layer(W, G, method=method, **pattern)
    spec = SparsitySpec.parse(**pattern)
    assert pattern_ok(res.mask, spec)
    if not spec.is_nm:
        assert int(res.mask.sum()) == round((1 - spec.sparsity) * W.numel())
    assert torch.all(res.weight[~res.mask] == 0)
    assert 0 <= res.error < 1.5 and res.info["seconds"] >= 0
    if method in ("magnitude", "wanda", "dsnot"):  # no weight update
        assert torch.equal(res.weight[res.mask], W[res.mask])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_shape_device_preserved(method, dtype):
    W, G = random_layer(seed=1)
    W = W.to(dtype)
    res = alpsprune.prune_layer(W, G, method=method, sparsity=0.6)
    assert res.weight.dtype == dtype and res.weight.shape == W.shape and res.weight.device == W.device
    assert torch.isfinite(res.weight).all()
    assert int((res.weight != 0).sum()) <= res.mask.sum()


@pytest.mark.parametrize("method", METHODS)
def test_robust_numerics(method):
    """Rank-deficient gram, dead input channels, huge dynamic range: finite output, exact pattern."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(16, 64, generator=g)  # 16 tokens < 64 features: rank-deficient
    X[:, 5] = 0
    X[:, 40:44] = 0  # dead channels
    X[:, 10] *= 1e4  # huge dynamic range
    W = torch.randn(32, 64, generator=g)
    W[0, :8] *= 1e3
    for pattern in ({"sparsity": 0.8}, {"mask_structure": "2:4"}):
        res = alpsprune.prune_layer(W, X.T @ X, method=method, **pattern)
        assert torch.isfinite(res.weight).all()
        assert pattern_ok(res.mask, SparsitySpec.parse(**pattern))


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_gram(method):
    W, _ = random_layer(seed=3)
    res = alpsprune.prune_layer(W, torch.zeros(64, 64), method=method, sparsity=0.5)
    assert torch.isfinite(res.weight).all() and int(res.mask.sum()) == W.numel() // 2


@pytest.mark.parametrize("method", METHODS)
def test_ties_are_deterministic(method):
    """Dequantised 4-bit weights: many equal magnitudes; same input → same mask, exact count."""
    g = torch.Generator().manual_seed(4)
    W = torch.randint(-7, 8, (32, 64), generator=g).float() * 0.05
    _, G = random_layer(32, 64, seed=4)
    a = alpsprune.prune_layer(W, G, method=method, sparsity=0.55)
    b = alpsprune.prune_layer(W.clone(), G.clone(), method=method, sparsity=0.55)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    assert int(a.mask.sum()) == round(0.45 * W.numel())


def test_topk_tie_break_prefers_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert topk_mask(scores, 2).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 37, 300, 511, 512])
def test_topk_mask_equals_stable_sort(dtype, k):
    """The threshold selection (NumPy introselect on CPU) equals a stable descending sort, ties included."""
    scores = torch.randint(0, 9, (16, 32), generator=torch.Generator().manual_seed(k)).to(dtype)
    order = torch.sort(scores.reshape(-1).float(), descending=True, stable=True).indices[:k]
    expected = torch.zeros(512, dtype=torch.bool).scatter_(0, order, True).reshape(16, 32)
    assert torch.equal(topk_mask(scores, k), expected)


def test_relative_error_matches_definition():
    W, G = random_layer(seed=5)
    Wp = W * (torch.rand_like(W) > 0.5)
    d = (W - Wp).double()
    expected = torch.trace(d @ G.double() @ d.T) / torch.trace(W.double() @ G.double() @ W.double().T)
    assert alpsprune.relative_error(W, Wp, G) == pytest.approx(float(expected), rel=1e-10)


def _relative_error_whole(dense: torch.Tensor, pruned: torch.Tensor, G: torch.Tensor) -> float:
    """The error report before it was computed in slabs: everything in float64 at once."""
    G = G.to(torch.float64)
    W_hat = dense.to(torch.float64)
    delta = W_hat - pruned.to(torch.float64)
    return float(((delta @ G) * delta).sum() / ((W_hat @ G) * W_hat).sum())


@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["pruned", "near_zero"])
def test_relative_error_in_slabs_equals_whole_float64(monkeypatch, gram_dtype, case):
    """Row slabs of W (and column slabs of a non-float64 G) give the one-shot float64 value to ~1e-12,
    also when the error is tiny (Ŵ − W ≈ 1e-6 relative: the difference is exact in float64, so
    slabbing must not lose it). Slabs of 5 rows / columns: uneven, several of each."""
    from alpsprune import masks

    W, G = random_layer(out_f=23, in_f=64, seed=7)
    G = G.to(gram_dtype)
    if case == "pruned":
        Wp = W * (torch.rand(W.shape, generator=torch.Generator().manual_seed(8)) > 0.6)
    else:
        Wp = W + 1e-6 * torch.randn(W.shape, generator=torch.Generator().manual_seed(8)) * W.abs()
    whole = _relative_error_whole(W, Wp, G)
    # independent of both: one einsum over all rows
    d, Wd, Gd = W.double() - Wp.double(), W.double(), G.double()
    direct = float(torch.einsum("oi,ij,oj->", d, Gd, d) / torch.einsum("oi,ij,oj->", Wd, Gd, Wd))
    monkeypatch.setattr(masks, "ROW_SLAB_ELEMENTS", 5 * 64)
    slabbed = alpsprune.relative_error(W, Wp, G)
    assert (case == "near_zero") == (whole < 1e-9)
    assert slabbed == pytest.approx(whole, rel=1e-12)
    assert slabbed == pytest.approx(direct, rel=1e-12)


BAD_INPUTS = [
    ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
    ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
    ({"sparsity": float("nan")}, "sparsity must be in [0, 1)"),
    ({}, "give `sparsity`"),
    ({"sparsity": 0.4, "mask_structure": "2:4"}, "contradicts"),
    ({"mask_structure": "0:0"}, "means unstructured"),
    ({"mask_structure": "5:4"}, "cannot exceed"),
    ({"mask_structure": "2-4"}, "N:M"),
    ({"mask_structure": "2:6"}, "multiple of"),  # in=64 is not a multiple of 6
    ({"sparsity": 0.5, "method": "obs"}, "unknown method"),
    ({"sparsity": 0.5, "method": "alps", "rho": 1.0}, "unknown option"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_bad_arguments(kwargs, message):
    W, G = random_layer()
    kwargs = {"method": "alps", **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        alpsprune.prune_layer(W, G, **kwargs)


def test_bad_tensors():
    W, G = random_layer()
    with pytest.raises(ValueError, match="shape mismatch"):
        alpsprune.prune_layer(W, G[:10, :10], sparsity=0.5)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        alpsprune.prune_layer(Wn, G, sparsity=0.5)
    Gn = G.clone()
    Gn[1, 1] = float("inf")
    with pytest.raises(ValueError, match="gram .* NaN or Inf"):
        alpsprune.prune_layer(W, Gn, sparsity=0.5)
    with pytest.raises(ValueError, match="2-D"):
        alpsprune.prune_layer(W[0], G, sparsity=0.5)


@pytest.mark.parametrize(("n_keep", "m"), [(2, 4), (1, 4), (3, 8), (1, 2), (4, 16)])
def test_nm_mask_pairwise_rank_equals_stable_sort(n_keep, m):
    """The sort-free N:M selection (pairwise ranks) equals a stable descending sort, ties included."""
    from alpsprune.masks import nm_mask

    scores = torch.randint(0, 4, (13, m * 7), generator=torch.Generator().manual_seed(m)).float()
    groups = scores.reshape(13, 7, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n_keep]
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(13, -1)
    assert torch.equal(nm_mask(scores, n_keep, m), expected)
