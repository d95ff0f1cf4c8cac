"""DSnoT solver: the authors' rule (zyxxmu/DSnoT ``prune_DSnoT``), weights untouched, counts kept."""

from __future__ import annotations

import pytest
import torch

from alpsprune import Gram, prune_layer
from alpsprune.masks import pattern_ok
from alpsprune.solvers.dsnot import row_errors, solve_dsnot
from alpsprune.solvers.wanda import solve_wanda
from alpsprune.sparsity import SparsitySpec


def sample_inputs(in_features: int, samples: int = 4, tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """``(samples, tokens, in)`` inputs with a feature-dependent mean (as LLM activations have)."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(in_features, generator=gen)
    scale = torch.rand(in_features, generator=gen) + 0.2
    return torch.randn(samples, tokens, in_features, generator=gen) * scale + offset


def gram_of(X: torch.Tensor) -> Gram:
    gram = Gram(X.shape[-1])
    gram.add_batch(X)
    return gram


def weight(out_features: int, in_features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def hand_gram(s: list[float], var: list[float]) -> Gram:
    """One sample of one token's worth of statistics: sample sum ``s``, variance ``var``."""
    s_t, v_t = torch.tensor(s, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)
    return Gram.from_matrix(torch.diag(v_t + s_t**2), mean=s_t, count=1, samples=1)


# --- the statistics the authors' code accumulates ----------------------------------------------


def test_gram_sample_statistics_match_the_authors_running_formulas():
    """``sample_sum`` and ``var`` equal what WrappedGPT.add_batch accumulates, one sample per call."""
    X = sample_inputs(12, samples=5, tokens=16, seed=3).double()
    gram = Gram(12)
    gram.add_batch(X[:2])  # samples arrive in batches of any size
    gram.add_batch(X[2:])
    # the authors' streaming updates (layerwrapper.py), one sample per forward
    ntokens = 0
    sum_metric = torch.zeros(12, dtype=torch.float64)
    mean = var = torch.zeros(12, dtype=torch.float64)
    for nsamples, x in enumerate(X):
        inp = x.T  # (in, tokens)
        m, v, n = inp.mean(1), inp.var(1, unbiased=False), inp.shape[1]
        var = v if ntokens == 0 else (var * ntokens + v * n) / (ntokens + n)
        mean = m if ntokens == 0 else (mean * ntokens + m * n) / (ntokens + n)
        ntokens += n
        sum_metric *= nsamples / (nsamples + 1)
        sum_metric += inp.sum(1) / (nsamples + 1)
    assert gram.samples == 5 and gram.count == 80
    torch.testing.assert_close(gram.sample_sum, sum_metric, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gram.var, var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram.mean, mean, rtol=1e-6, atol=1e-6)
    # within-sample variance, not the variance over all tokens (the samples have different means)
    X2 = X.clone()
    X2[0] += 10.0
    shifted = gram_of(X2)
    torch.testing.assert_close(shifted.var, gram.var, rtol=1e-3, atol=1e-4)  # float32 batch products
    total = torch.diagonal(shifted.G) / shifted.count - shifted.mean**2
    assert bool((total > shifted.var + 10).all())
    # a 2-D input is one sample (as the authors' add_batch treats it)
    flat = gram_of(X.reshape(-1, 12))
    assert flat.samples == 1
    torch.testing.assert_close(flat.sample_sum, X.reshape(-1, 12).sum(0), rtol=1e-6, atol=1e-5)


# --- the rule on a hand-made case -----------------------------------------------------------------

#  j:        0     1     2     3      4     5     6     7
W_HAND = [2.0, -1.0, 1.0, -1.0, 0.5, 0.4, 0.3, -0.2]
S_HAND = [1.0, 1.0, 0.5, 0.3, 1.0, 1.0, 1.0, 1.0]
V_HAND = [3.0, 8.0, 6.0, 3.91, 1.0, 0.25, 1.0, 1.0]
# contributions c = W·s: [2, -1, .5, -.3, .5, .4, .3, -.2]; Wanda |W|·sqrt(var + s²):
# [4, 3, 2.5, 2, .71, .45, .42, .28] -> 50% keeps {0, 1, 2, 3}; ε = .5 + .4 + .3 - .2 = 1.0
# grow list (c/var for pruned, 0 for kept, ascending): 7(-.2) 0 1 2 3 6(.3) 4(.5) 5(1.6)
# prune list (kept by ascending Wanda 3,2,1,0; negatives in order, positives reversed): 3 1 0 2
# cycle 1: ε>0: grow 5 (top), prune 3 (start): ε = 1 - .3 - .4 = .3 (same sign) -> swap
# cycle 2: ε>0: grow 4, prune 1: ε' = .3 - 1 - .5 = -1.2: sign flips -> the row stops (sign check);
#          without the check the swap is made: ε = -1.2
# cycle 3 (no check): ε<0: grow 7 (bottom), prune 2 (end): ε = -1.2 + .5 + .2 = -.5 -> swap
# cycle 4 (no check): the bottom of the grow list is a kept weight: no negative pruned one is left,
#          the row stops (the authors' code would re-grow/prune kept weights here, a no-op)


def _kept(mask: torch.Tensor) -> set[int]:
    return {int(j) for j in torch.nonzero(mask[0]).flatten()}


def test_hand_made_case_unstructured():
    W = torch.tensor([W_HAND])
    gram = hand_gram(S_HAND, V_HAND)
    spec = SparsitySpec.parse(0.5)
    _, wanda_mask, _ = solve_wanda(W, gram, spec)
    assert _kept(wanda_mask) == {0, 1, 2, 3}
    _, mask, info = solve_dsnot(W, gram, spec, stop_on_sign_flip=True)
    assert _kept(mask) == {0, 1, 2, 5} and info["swaps"] == 1 and info["cycles"] == 2
    assert float(row_errors(W, mask, gram.sample_sum)[0]) == pytest.approx(0.3)
    _, mask, info = solve_dsnot(W, gram, spec)  # the authors' unstructured default: no sign check
    assert _kept(mask) == {0, 4, 5, 7} and info["swaps"] == 3 and info["rows_refined"] == 1
    assert float(row_errors(W, mask, gram.sample_sum)[0]) == pytest.approx(-0.5)
    # the threshold is checked before each swap: 1.0 > .5 swaps, then .3 stops the row
    _, mask, info = solve_dsnot(W, gram, spec, threshold=0.5, stop_on_sign_flip=False)
    assert _kept(mask) == {0, 1, 2, 5} and info["swaps"] == 1
    _, mask, _ = solve_dsnot(W, gram, spec, max_cycles=1, stop_on_sign_flip=False)
    assert _kept(mask) == {0, 1, 2, 5}
    _, mask, info = solve_dsnot(W, gram, spec, threshold=1.5)  # |ε| = 1.0 is not above 1.5
    assert torch.equal(mask, wanda_mask) and info["swaps"] == 0 and info["rows_refined"] == 0


def test_hand_made_case_two_four():
    """2:4 prunes the smallest-Wanda kept weight of the grown weight's group, whatever its sign."""
    W = torch.tensor([W_HAND])
    gram = hand_gram(S_HAND, V_HAND)
    spec = SparsitySpec.parse(mask_structure="2:4")
    _, wanda_mask, _ = solve_wanda(W, gram, spec)
    assert _kept(wanda_mask) == {0, 1, 4, 5}  # ε = .5 - .3 + .3 - .2 = .3
    # grow list: 7(-.2) 3(-.077) 0 1 4 5 2(.083) 6(.3)
    # cycle 1: grow 6; its group {4..7} keeps 4 (Wanda .71) and 5 (.45): prune 5 (c = .4):
    #          ε = .3 + .4 - .3 = .4 — larger, same sign: the authors' rule swaps
    # cycle 2: grow 2; group {0..3} keeps 0 (4) and 1 (3): prune 1 (c = -1): ε' = -1.1, flips: stop
    _, mask, info = solve_dsnot(W, gram, spec)
    assert _kept(mask) == {0, 1, 4, 6} and info["swaps"] == 1
    assert float(row_errors(W, mask, gram.sample_sum)[0]) == pytest.approx(0.4)


# --- the rule on random layers, against an independent per-row loop -----------------------------


def reference_dsnot(W, gram, spec, max_cycles=50, threshold=0.1, pow_of_var=1.0, same_sign=True):
    """Plain-Python restatement of the authors' loop, one row at a time (lists and two pointers)."""
    _, mask, _ = solve_wanda(W, gram, spec)
    mask = mask.clone()
    s = gram.sample_sum.tolist()
    var = gram.var.tolist()
    wanda = (W.abs().double() * torch.diagonal(gram.G).sqrt()[None, :]).float().double()
    out_features, n = W.shape
    for i in range(out_features):
        kept0 = [bool(b) for b in mask[i]]
        c = [float(W[i, j]) * s[j] for j in range(n)]
        key = [0.0 if kept0[j] else c[j] / max(var[j], 1e-300) ** pow_of_var for j in range(n)]
        grow = sorted(range(n), key=lambda j: key[j])  # Python's sort is stable
        by_wanda = sorted((j for j in range(n) if kept0[j]), key=lambda j: float(wanda[i, j]))
        prune = [j for j in by_wanda if c[j] < 0] + [j for j in by_wanda if c[j] == 0]
        prune += [j for j in reversed(by_wanda) if c[j] > 0]
        gl, gh, pl, ph = 0, n - 1, 0, len(prune) - 1
        kept = list(kept0)
        eps = sum(c[j] for j in range(n) if not kept[j])
        sign0 = (eps > 0) - (eps < 0)
        for _ in range(max_cycles):
            if eps > 0:
                g, gh = grow[gh] if gl <= gh else None, gh - 1
            else:
                g, gl = grow[gl] if gl <= gh else None, gl + 1
            if g is None or kept[g] or c[g] * eps <= 0:
                break
            if spec.is_nm:
                first = g - g % spec.m
                group = [j for j in range(first, first + spec.m) if kept[j] and kept0[j]]
                if not group:
                    break
                p = min(group, key=lambda j: (float(wanda[i, j]), j))
            else:
                if eps < 0:
                    p, ph = prune[ph] if pl <= ph else None, ph - 1
                else:
                    p, pl = prune[pl] if pl <= ph else None, pl + 1
                if p is None or not kept[p] or c[p] * eps >= 0:
                    break
            after = eps + c[p] - c[g]
            if abs(eps) <= threshold or (same_sign and (after > 0) - (after < 0) != sign0):
                break
            kept[g], kept[p], eps = True, False, after
        mask[i] = torch.tensor(kept)
    return mask


@pytest.mark.parametrize(
    ("target", "same_sign", "threshold"),
    [
        ({"sparsity": 0.5}, True, 0.1),
        ({"sparsity": 0.5}, False, 0.1),
        ({"sparsity": 0.7}, True, 1.0),
        ({"sparsity": 0.7}, False, 0.1),
        ({"mask_structure": "2:4"}, True, 0.1),
        ({"mask_structure": "4:8"}, True, 0.1),
        ({"mask_structure": "2:4"}, False, 0.1),
    ],
)
def test_matches_independent_loop(target, same_sign, threshold):
    W = weight(24, 256, seed=5)
    gram = gram_of(sample_inputs(256, samples=4, tokens=32, seed=6))
    spec = SparsitySpec.parse(**target)
    expected = reference_dsnot(W, gram, spec, threshold=threshold, same_sign=same_sign)
    _, mask, info = solve_dsnot(W, gram, spec, threshold=threshold, stop_on_sign_flip=same_sign)
    assert torch.equal(mask, expected)
    assert info["swaps"] > 24  # several swaps per row on average: the rule is exercised


def test_threshold_is_on_the_per_sample_token_sum():
    """The 0.1 threshold is on ``Σ_tokens`` of each sample (averaged over samples), not on the mean.

    Here every row's per-token error is below 0.1 while its per-sample sum (64 tokens) is far above;
    a per-token rule leaves the Wanda mask unchanged, the authors' rule refines almost every row.
    """
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 64, 128, generator=gen)
    X = 0.5 * (noise - noise.mean((0, 1))) + 0.005 * torch.randn(128, generator=gen)
    gram = gram_of(X)
    W = weight(32, 128, seed=2)
    spec = SparsitySpec.parse(0.6)
    _, wanda_mask, _ = solve_wanda(W, gram, spec)
    assert float(row_errors(W, wanda_mask, gram.mean).abs().max()) < 0.1
    assert int((row_errors(W, wanda_mask, gram.sample_sum).abs() > 0.1).sum()) >= 26
    _, mask, info = solve_dsnot(W, gram, spec)
    assert info["rows_refined"] >= 16
    assert int((mask != wanda_mask).any(1).sum()) == info["rows_refined"]


# --- invariants -------------------------------------------------------------------------------------

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
    gram = gram_of(sample_inputs(in_features))
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
    eps_wanda = row_errors(W, wanda_mask, gram.sample_sum)
    eps_dsnot = row_errors(W, mask, gram.sample_sum)
    if spec.is_nm:  # the authors' N:M rule checks the sign: the error never changes sign
        assert bool((torch.sign(eps_dsnot) == torch.sign(eps_wanda)).all())
    # (without the check a row may overshoot back and forth: their unstructured rule does not
    # promise a smaller |ε|, so nothing is asserted about it here)
    # with the sign check, unstructured swaps (grow and prune both move ε towards 0) never grow |ε|
    _, checked, _ = solve_dsnot(W, gram, spec, stop_on_sign_flip=True)
    eps_checked = row_errors(W, checked, gram.sample_sum)
    assert bool((torch.sign(eps_checked) == torch.sign(eps_wanda)).all())
    if not spec.is_nm:
        assert bool((eps_checked.abs() <= eps_wanda.abs() + 1e-9).all())
        assert float(eps_checked.abs().sum()) < float(eps_wanda.abs().sum())
    assert result.info["swaps"] > 0 and 1 <= result.info["cycles"] <= 50
    assert not torch.equal(mask, wanda_mask)


def test_default_sign_check_is_the_authors():
    """Their N:M code always checks the sign; their released unstructured default never does."""
    W = weight(16, 128, seed=7)
    gram = gram_of(sample_inputs(128, seed=8))
    for target, check in (({"sparsity": 0.6}, False), ({"mask_structure": "2:4"}, True)):
        spec = SparsitySpec.parse(**target)
        default = solve_dsnot(W, gram, spec)[1]
        assert torch.equal(default, solve_dsnot(W, gram, spec, stop_on_sign_flip=check)[1])
        assert not torch.equal(default, solve_dsnot(W, gram, spec, stop_on_sign_flip=not check)[1])


def test_max_cycles():
    W = weight(20, 128)
    gram = gram_of(sample_inputs(128))
    spec = SparsitySpec.parse(0.6)
    _, wanda_mask, _ = solve_wanda(W, gram, spec)
    _, mask0, info0 = solve_dsnot(W, gram, spec, max_cycles=0)
    assert torch.equal(mask0, wanda_mask) and info0["swaps"] == 0 and info0["cycles"] == 0
    _, mask1, info1 = solve_dsnot(W, gram, spec, max_cycles=1)
    assert info1["cycles"] == 1 and 0 < info1["swaps"] <= W.shape[0]
    assert int((mask1 != wanda_mask).sum()) == 2 * info1["swaps"]  # one in, one out per swap
    _, _, info = solve_dsnot(W, gram, spec, max_cycles=3)
    assert info["swaps"] <= 3 * W.shape[0]
    with pytest.raises(ValueError, match="max_cycles"):
        solve_dsnot(W, gram, spec, max_cycles=-1)


def test_without_input_sums_is_wanda():
    """A plain G tensor has no input sums: every ε is 0 and DSnoT returns the Wanda mask."""
    W = weight(8, 32)
    G = gram_of(sample_inputs(32)).G
    dsnot = prune_layer(W, G, method="dsnot", sparsity=0.5)
    wanda = prune_layer(W, G, method="wanda", sparsity=0.5)
    assert torch.equal(dsnot.mask, wanda.mask) and dsnot.info["swaps"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_shape_device_preserved(dtype):
    W = weight(8, 32).to(dtype)
    result = prune_layer(W, gram_of(sample_inputs(32)), method="dsnot", sparsity=0.5)
    assert (
        result.weight.dtype == dtype and result.weight.shape == W.shape and result.weight.device == W.device
    )
    assert torch.equal(result.weight[result.mask], W[result.mask])


def test_dead_and_constant_channels():
    """Zero inputs (sum 0, var 0) and constant inputs (var 0, sum ≠ 0) give finite results."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 64, 32, generator=gen) + 0.5
    X[..., [1, 2]] = 0.0
    X[..., [7, 9]] = 1.5
    gram = gram_of(X)
    W = weight(6, 32)
    for target in ({"sparsity": 0.5}, {"mask_structure": "2:4"}):
        result = prune_layer(W, gram, method="dsnot", **target)
        assert bool(torch.isfinite(result.weight).all())
        assert torch.equal(result.weight[result.mask], W[result.mask])


def test_vectorised_is_fast():
    import time

    W = weight(512, 1024)
    gram = gram_of(sample_inputs(1024, samples=4, tokens=128))
    start = time.perf_counter()
    result = prune_layer(W, gram, method="dsnot", sparsity=0.6)
    assert time.perf_counter() - start < 10.0
    assert result.info["swaps"] > 512
