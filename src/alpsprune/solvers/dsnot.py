"""DSnoT (Zhang et al., "Dynamic Sparse No Training", ICLR 2024; SPEC §3): mask refinement only.

Start from the Wanda mask and never change a weight's value. The rule below is the one in the
authors' released code (github.com/zyxxmu/DSnoT, ``lib/prune.py`` ``prune_DSnoT``), with their
defaults: 50 cycles, threshold 0.1, variance power 1.

**Scale.** The authors' input statistic is the input *summed over the tokens of each calibration
sample*, averaged over the samples (``s = gram.sample_sum``; for equal-length samples
``s = seqlen · E[x]``), and the 0.1 threshold is on that scale. Their contribution of weight
``(i, j)`` is ``c_ij = Ŵ_ij s_j`` and a row's error is

    ε_i = Σ_j (1 − M_ij) c_ij          (expected dense output minus expected sparse output)

**Candidate lists, fixed before the first cycle, walked with one pointer per end:**

* *grow* — every weight of the row sorted (stably, ascending) by ``c_ij / Var[x_j]^pow_of_var``
  for pruned weights and 0 for kept ones (``Var`` = ``gram.var``, the within-sample variance the
  authors' code accumulates). ``ε_i > 0`` takes the next weight from the top end (largest
  positive ratio), otherwise from the bottom end (most negative).
* *prune* (unstructured) — the kept weights ordered by ascending Wanda score, then split: the
  negative-contribution ones in that order first, the positive ones in reverse after them.
  ``ε_i < 0`` takes the next one from the end (the positive contribution with the smallest Wanda
  score), otherwise from the start (the negative one with the smallest Wanda score).
* *prune* (N:M) — in the grown weight's group of ``M``, the kept weight of the Wanda mask (not one
  grown by DSnoT, not one already pruned by it) with the smallest Wanda score, whatever its sign,
  so every group keeps exactly its N.

**Each cycle**, for every row still active, take the two candidates; the swap (grow one, prune
one) is made only while ``|ε_i| > threshold`` — checked *before* the swap, so the last swap may
end anywhere — and, when the sign check is on, only if the error after the swap keeps the sign it
had before the first cycle. A row that fails a check stops for good. At most ``max_cycles``
cycles.

The sign check: the authors' N:M code always makes it; their unstructured code makes it unless
``--without_same_sign``, an ``argparse`` flag declared ``type=bool, default=True`` since their
commit 297993f (Dec 2023), so their released unstructured runs never check. The default
``stop_on_sign_flip=None`` reproduces exactly that (check for N:M, not for unstructured);
``True``/``False`` force it either way.

Deviations, only where the authors' code does something no one would want: a row also stops
when its list of candidates of the needed sign is used up (theirs would walk into kept weights or
weights of the wrong sign and add error), and a zero-variance input ranks by ``|c|/tiny`` instead
of dividing by zero (theirs yields inf/NaN keys). Neither happens with 50 cycles on real layers.

The authors' default also skips every MLP layer (``--skip_layer mlp``: those keep the Wanda mask);
that is a choice of layers, not of the rule, and alpsprune refines every layer it prunes.

Swaps are one-in-one-out within a row (and within a group for N:M), so the per-row counts — and
hence the exact layer total of the Wanda mask — never change. Without input sums (a plain ``G``
tensor carries none) every ``ε_i`` is 0 and the result is the Wanda mask.
"""

from __future__ import annotations

import torch

from ..sparsity import SparsitySpec
from ..stats import Gram
from .base import register
from .wanda import solve_wanda, wanda_scores


def row_errors(W_hat: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``ε_i = Σ_j (1 − M_ij) Ŵ_ij s_j`` for every row, float64 (``s`` = ``gram.sample_sum``)."""
    contrib = W_hat.to(torch.float64) * scale.to(device=W_hat.device, dtype=torch.float64)[None, :]
    return (contrib * (~mask)).sum(1)


def _prune_order(contrib: torch.Tensor, mask: torch.Tensor, wanda: torch.Tensor) -> torch.Tensor:
    """Per row: kept weights, negative contributions by ascending Wanda score, then (zero ones,) then
    positive ones by descending Wanda score; pruned weights after them (never reached)."""
    in_features = mask.shape[1]
    by_wanda = torch.sort(torch.where(mask, wanda, torch.inf), dim=1, stable=True).indices
    rank = torch.empty_like(by_wanda)
    rank.scatter_(1, by_wanda, torch.arange(in_features, device=mask.device).expand_as(by_wanda))
    rank = rank.to(torch.float64)
    key = torch.where(contrib < 0, rank, torch.where(contrib > 0, 3 * in_features - rank, in_features + rank))
    key = torch.where(mask, key, torch.inf)
    return torch.sort(key, dim=1, stable=True).indices


@register("dsnot")
def solve_dsnot(
    W_hat: torch.Tensor,
    gram: Gram,
    spec: SparsitySpec,
    *,
    max_cycles: int = 50,
    threshold: float = 0.1,
    pow_of_var: float = 1.0,
    stop_on_sign_flip: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DSnoT on top of Wanda, the authors' rule (see the module docstring).

    :param max_cycles: swap cycles per row at most (authors: 50).
    :param threshold: swaps continue while ``|ε_i|`` (per-sample token-sum scale) exceeds this (0.1).
    :param pow_of_var: exponent of ``Var[x_j]`` in the grow order (authors: 1; 0 ignores variance).
    :param stop_on_sign_flip: stop a row instead of a swap that would flip the sign of its error;
        ``None`` (default) does what the authors' released code does: check for N:M, not for
        unstructured masks.
    """
    if max_cycles < 0:
        raise ValueError(f"max_cycles must be >= 0, got {max_cycles}")
    if stop_on_sign_flip is None:
        stop_on_sign_flip = spec.is_nm
    _, mask, _ = solve_wanda(W_hat, gram, spec)
    mask = mask.clone()
    wanda_mask = mask.clone()
    out_features, in_features = W_hat.shape
    device = W_hat.device
    contrib = W_hat.to(torch.float64) * gram.sample_sum.to(device=device, dtype=torch.float64)[None, :]
    var = gram.var.to(device=device, dtype=torch.float64)
    # a constant input (zero variance) gives an exactly predictable reduction: ranked first, finitely
    tiny = torch.finfo(torch.float64).tiny
    grow_weight = var.clamp_min(tiny).pow(-pow_of_var) if pow_of_var else torch.ones_like(var)
    grow_order = torch.sort(
        torch.where(mask, 0.0, contrib * grow_weight[None, :]), dim=1, stable=True
    ).indices
    wanda = wanda_scores(W_hat, gram).to(torch.float64)
    eps = (contrib * (~mask)).sum(1)
    eps_start = eps.clone()
    sign0 = torch.sign(eps)

    rows = torch.arange(out_features, device=device)
    last = in_features - 1
    grow_lo = torch.zeros(out_features, dtype=torch.long, device=device)
    grow_hi = torch.full((out_features,), last, dtype=torch.long, device=device)
    if not spec.is_nm:
        prune_order = _prune_order(contrib, mask, wanda)
        prune_lo = torch.zeros_like(grow_lo)
        prune_hi = mask.sum(1) - 1
    active = torch.ones(out_features, dtype=torch.bool, device=device)
    refined = torch.zeros_like(active)
    cycles = swaps = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        # grow: the next pruned weight of the sign of ε from the matching end of the grow list
        up = eps > 0
        g_ok = grow_lo <= grow_hi
        g = grow_order[rows, torch.where(up, grow_hi, grow_lo).clamp(0, last)]
        grow_hi -= up.long()
        grow_lo += (~up).long()
        g_ok &= ~mask[rows, g] & (contrib[rows, g] * eps > 0)
        if spec.is_nm:  # prune: smallest-Wanda kept weight of the Wanda mask in g's group
            first = (g // spec.m) * spec.m
            group = first[:, None] + torch.arange(spec.m, device=device)[None, :]
            still = (mask & wanda_mask).gather(1, group)
            best, local = torch.where(still, wanda.gather(1, group), torch.inf).min(1)
            p = first + local
            p_ok = torch.isfinite(best)
        else:  # prune: the next kept weight of the opposite sign from the matching end
            down = eps < 0
            p_ok = prune_lo <= prune_hi
            p = prune_order[rows, torch.where(down, prune_hi, prune_lo).clamp(0, last)]
            prune_hi -= down.long()
            prune_lo += (~down).long()
            p_ok &= mask[rows, p] & (contrib[rows, p] * eps < 0)
        after = eps + contrib[rows, p] - contrib[rows, g]
        active &= g_ok & p_ok & (eps.abs() > threshold)
        if stop_on_sign_flip:
            active &= torch.sign(after) == sign0
        mask[rows[active], g[active]] = True
        mask[rows[active], p[active]] = False
        eps = torch.where(active, after, eps)
        refined |= active
        swaps += int(active.sum())

    info = {
        "cycles": cycles,
        "swaps": swaps,
        "rows_refined": int(refined.sum()),
        "mean_abs_error_start": float(eps_start.abs().mean()) if out_features else 0.0,
        "mean_abs_error_end": float(eps.abs().mean()) if out_features else 0.0,
    }
    return W_hat * mask, mask, info
