"""Hypothesis property tests: every solver's output has exactly the requested pattern, whatever the input.

For random shapes (out 1..24, in a multiple of M up to 64), random calibration inputs (few tokens, so the Gram
is often rank-deficient, and sometimes dead input channels), float32 or bfloat16 weights, random unstructured sparsities and random N:M:

* unstructured: exactly ``round((1 - s) · out · in)`` weights kept (layer-wide);
* N:M: at most N kept in every group of M consecutive inputs of a row;
* the weight is zero wherever the mask is off, and finite everywhere;
* the same call twice gives the same bits (deterministic tie-breaking, no randomness).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpsprune import prune_layer

METHODS = {
    "magnitude": {},
    "wanda": {},
    "sparsegpt": {},
    "dsnot": {},
    "alps": {"max_iter": 30, "pcg_steps": 5},
}


@st.composite
def layer_problems(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    out_f = draw(st.integers(1, 24))
    in_f = m * draw(st.integers(1, 64 // m))
    tokens = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        pattern = {"sparsity": draw(st.floats(0.0, 0.95, allow_nan=False))}
    else:
        pattern = {"mask_structure": f"{draw(st.integers(1, m))}:{m}"}
    dead = draw(st.integers(0, in_f - 1))  # number of all-zero input channels
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))  # bf16: many exact ties
    return out_f, in_f, tokens, seed, pattern, dead, scale, dtype


def _problem(out_f, in_f, tokens, seed, dead, scale, dtype):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen).to(dtype)
    X = torch.randn(tokens, in_f, generator=gen) * scale
    if dead:
        X[:, torch.randperm(in_f, generator=gen)[:dead]] = 0.0
    from alpsprune.stats import Gram

    gram = Gram(in_f)
    gram.add_batch(X)
    return W, gram


@pytest.mark.parametrize("method", list(METHODS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=layer_problems())
def test_solver_pattern_guarantees(method, problem) -> None:
    out_f, in_f, tokens, seed, pattern, dead, scale, dtype = problem
    W, gram = _problem(out_f, in_f, tokens, seed, dead, scale, dtype)
    result = prune_layer(W, gram, method, **pattern, **METHODS[method])
    pruned, mask = result.weight, result.mask

    assert pruned.shape == W.shape and pruned.dtype == W.dtype
    assert mask.dtype == torch.bool and mask.shape == W.shape
    assert bool(torch.isfinite(pruned).all())
    assert not bool(pruned[~mask].ne(0).any()), "non-zero weight off the mask"
    if "sparsity" in pattern:
        k = round((1.0 - pattern["sparsity"]) * out_f * in_f)
        assert int(mask.sum()) == k
        assert int(pruned.ne(0).sum()) <= k
    else:
        n, m = (int(x) for x in pattern["mask_structure"].split(":"))
        per_group = mask.reshape(out_f, in_f // m, m).sum(-1)
        assert int(per_group.max()) <= n
        assert int(pruned.ne(0).reshape(out_f, in_f // m, m).sum(-1).max()) <= n
    if method in ("magnitude", "wanda", "dsnot"):  # mask-only methods never change a kept value
        assert torch.equal(pruned[mask], W[mask])

    again = prune_layer(W, gram, method, **pattern, **METHODS[method])
    assert torch.equal(again.mask, mask)
    assert torch.equal(again.weight.view(torch.uint8), pruned.view(torch.uint8))
