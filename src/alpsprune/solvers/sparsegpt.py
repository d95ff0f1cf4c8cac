"""SparseGPT (Frantar & Alistarh 2023; SPEC §3): blockwise OBS with lazy batched updates.

``H = G + λI`` with ``λ = dampening_frac · mean(diag G)``; ``U`` is the upper Cholesky factor of
``H⁻¹`` (``H⁻¹ = UᵀU``). Columns are swept left to right in blocks of ``blocksize``. At the start
of each block the mask of that block is chosen from the *current* (already updated) weights by the
OBS score ``w² / U_jj²``; then each column's pruned entries are removed and the error is spread
over the remaining columns of the block, and once per block over all later columns (lazy update).

**Exact kept count (unstructured).** The original code thresholds every block at the per-block
quantile ``s``, which prunes ``floor(s · out · blocksize)`` (plus ties) per block, so the layer
total drifts from ``round(s · out · in)``. Here the layer's exact number of pruned weights
``T = out·in − round((1−s)·out·in)`` is first split over the blocks in proportion to their width
(largest-remainder rounding, deterministic), and each block then keeps exactly its share with
:func:`alpsprune.masks.topk_mask` over the whole ``(out, width)`` block (layer-wide within the
block, as the original's block quantile; ties go to the lower flat index). The total is therefore
exact by construction, and each block prunes within one weight-row-block of the original's share.

**N:M** (N = number *kept*): when the sweep reaches the first column of a group of ``M`` inputs,
the ``N`` entries with the largest OBS score of that group are kept, per row.

**Dead inputs** (``G_jj == 0``): they never influence the output, so their weights rank below
every live weight (pruned first, largest ``|w|`` last); their rows/columns of ``H`` are decoupled
(off-diagonals zeroed) so the factorisation stays solvable and nothing leaks into live columns.

**Cholesky failure**: a failed factorisation (``cholesky_ex`` info ≠ 0, or a non-finite factor)
is retried with ten times the dampening, up to ``max_dampening_retries`` times; the number of
retries and the final dampening are reported in ``info``. If it still fails a
:class:`~alpsprune.errors.SolverError` is raised — never a silent fallback to magnitude.

The inverse Cholesky factor is cached on the :class:`~alpsprune.stats.Gram`, so linears that share
an input (q/k/v, gate/up) factor it once. Factorisation and sweep in float32 (float64 only when the float32
factorisation fails); memory beyond ``G``: two in×in float32 buffers while factorising, then ``U``.
"""

from __future__ import annotations

import math

import torch

from ..errors import SolverError
from ..masks import nm_mask, topk_mask
from ..sparsity import SparsitySpec
from ..stats import Gram, lapack_threads
from .base import register

MAX_DAMPENING_RETRIES = 4  # 0.01 -> 0.1 -> 1 -> 10 -> 100 (× mean diag)


def _factor_attempt(gram: Gram, dead: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor | None:
    """``U`` (upper Cholesky factor of ``(G + λI)⁻¹``) computed in ``dtype``, as float32; ``None`` on failure.

    Memory: besides ``G`` at most two in×in ``dtype`` buffers at a time (each step's input is dropped
    as soon as its output exists), as in the reference implementation.
    """
    H = gram.G.to(dtype, copy=True)
    if bool(dead.any()):  # decouple dead inputs (already zero for a true Gram; robust otherwise)
        H[dead, :] = 0.0
        H[:, dead] = 0.0
    H.diagonal().add_(lam)
    with lapack_threads(H.device):
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if int(info) != 0:
            return None
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
    if int(info) != 0:
        return None
    U = U.to(torch.float32)
    if not (bool(torch.isfinite(U).all()) and bool((torch.diagonal(U) > 0).all())):
        return None
    return U


def _inverse_cholesky(gram: Gram, dampening_frac: float) -> dict:
    """Upper Cholesky factor ``U`` of ``(G + λI)⁻¹`` (float32) with retries on failure.

    Factorised in float32, the precision of the sweep (and of the reference implementation); when
    that fails at some λ the same λ is tried once in float64 before the dampening grows, so a
    float32 rounding problem never changes λ.
    """
    dead = torch.diagonal(gram.G) == 0
    frac = float(dampening_frac)
    retries = 0
    while True:
        lam = gram.damping(frac)
        for dtype in (torch.float32, torch.float64):
            U = _factor_attempt(gram, dead, lam, dtype)
            if U is not None:
                Gram.chol_count += 1
                return {
                    "U": U,
                    "dead": dead,
                    "lambda": lam,
                    "dampening_frac": frac,
                    "dampening_retries": retries,
                    "factor_dtype": str(dtype).removeprefix("torch."),
                }
        if retries >= MAX_DAMPENING_RETRIES:
            raise SolverError(
                f"sparsegpt: H = G + λI or the Cholesky factor of H⁻¹ failed even with dampening_frac={frac:g} "
                f"(λ={lam:.3g}) after {retries} retries with 10× more dampening; the gram is likely not a valid "
                f"XᵀX (check the calibration activations) — raise `dampening_frac` or use another method"
            )
        retries += 1
        frac *= 10.0


def _block_prune_counts(total: int, widths: list[int], rows: int) -> list[int]:
    """Split ``total`` pruned weights over blocks ∝ width, largest remainder, capped at block size."""
    size = rows * sum(widths)
    quotas = [total * rows * w / size if size else 0.0 for w in widths]
    counts = [min(math.floor(q), rows * w) for q, w in zip(quotas, widths, strict=True)]
    # deterministic order: largest fractional part first, then the earlier block
    order = sorted(range(len(widths)), key=lambda b: (-(quotas[b] - math.floor(quotas[b])), b))
    rest = total - sum(counts)
    while rest != 0:
        moved = False
        for b in order if rest > 0 else reversed(order):
            cap = rows * widths[b]
            if rest > 0 and counts[b] < cap:
                counts[b] += 1
                rest -= 1
                moved = True
            elif rest < 0 and counts[b] > 0:
                counts[b] -= 1
                rest += 1
                moved = True
            if rest == 0:
                break
        if not moved:  # cannot happen for 0 <= total <= rows*sum(widths)
            raise SolverError(f"sparsegpt: cannot split {total} pruned weights over blocks {widths}")
    return counts


def _obs_scores(w: torch.Tensor, d: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """``w² / d²`` for live inputs; dead inputs rank below all of them (by ``|w|`` among themselves)."""
    scores = w.square() / d.square()[None, :]
    if dead is not None:
        dead_scores = -1.0 / (1.0 + w.square())  # in [-1, 0): below any live score, monotone in |w|
        scores = torch.where(dead[None, :], dead_scores, scores)
    return scores


@register("sparsegpt")
def solve_sparsegpt(
    W_hat: torch.Tensor,
    gram: Gram,
    spec: SparsitySpec,
    *,
    dampening_frac: float = 0.01,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SparseGPT.

    :param dampening_frac: ``λ = dampening_frac · mean(diag G)``; multiplied by 10 on each
        Cholesky failure (at most 4 times) before giving up with ``SolverError``.
    :param blocksize: columns per block (mask selection and lazy update); for N:M it is rounded
        down to a multiple of M (at least M).
    """
    if blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize}")
    if not dampening_frac >= 0:
        raise ValueError(f"dampening_frac must be >= 0, got {dampening_frac}")
    out_features, in_features = W_hat.shape
    fact = gram.cache(
        ("sparsegpt_hinv", float(dampening_frac)), lambda: _inverse_cholesky(gram, dampening_frac)
    )
    U = fact["U"].to(W_hat.device)
    dead = fact["dead"].to(W_hat.device)
    n_dead = int(dead.sum())

    if spec.is_nm:
        blocksize = max(spec.m, (blocksize // spec.m) * spec.m)
    starts = list(range(0, in_features, blocksize))
    widths = [min(blocksize, in_features - s) for s in starts]
    if not spec.is_nm:
        total_pruned = out_features * in_features - spec.n_kept(out_features, in_features)
        block_pruned = _block_prune_counts(total_pruned, widths, out_features)

    W = W_hat.clone()
    mask = torch.ones_like(W, dtype=torch.bool)
    obs_loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for b, (i1, width) in enumerate(zip(starts, widths, strict=True)):
        i2 = i1 + width
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        if spec.is_nm:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            scores = _obs_scores(W1, d1, dead[i1:i2] if n_dead else None)
            mask1 = topk_mask(scores, out_features * width - block_pruned[b])
        Err1 = torch.zeros_like(W1)
        for i in range(width):
            if spec.is_nm and i % spec.m == 0:
                cols = slice(i, i + spec.m)
                group_scores = _obs_scores(
                    W1[:, cols], d1[cols], dead[i1 + i : i1 + i + spec.m] if n_dead else None
                )
                mask1[:, cols] = nm_mask(group_scores, spec.n_keep, spec.m)
            w = W1[:, i]
            d = d1[i]
            q = torch.where(mask1[:, i], w, torch.zeros_like(w))
            err = (w - q) / d
            obs_loss += (err.double() ** 2).sum() / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        if i2 < in_features:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    W = W * mask
    info = {
        "lambda": fact["lambda"],
        "dampening_frac": fact["dampening_frac"],
        "dampening_retries": fact["dampening_retries"],
        "blocksize": blocksize,
        "dead_inputs": n_dead,
        "obs_loss": float(obs_loss),
    }
    return W, mask, info
