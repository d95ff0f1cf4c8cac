"""Sparsity projections, pattern checks and the reconstruction error (SPEC §1).

All functions take weights or scores in the ``(out, in)`` layout of ``nn.Linear.weight``.
Ties are broken deterministically: among equal scores the one with the lower flat index wins,
so the same input always gives the same mask with exactly the requested number kept.
"""

from __future__ import annotations

import numpy as np
import torch

from .sparsity import SparsitySpec


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of a 1-D tensor, as a 0-d tensor on its device.

    On the CPU, NumPy's introselect is ~10× faster than ``torch.kthvalue`` (1 ms vs 10 ms for
    0.9 M floats, one thread) — this selection runs every ADMM iteration, so it matters.
    """
    n = flat.numel()
    if flat.device.type == "cpu":
        values = flat.detach()
        if values.dtype not in (torch.float16, torch.float32, torch.float64):
            values = values.float()  # e.g. bfloat16: NumPy has no such type; the cast keeps order
        picked = np.partition(values.numpy(), n - k)[n - k]
        return torch.tensor(picked.item(), dtype=flat.dtype)
    return torch.kthvalue(flat, n - k + 1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping exactly the ``k`` largest entries of ``scores`` (layer-wide).

    Selection is a linear-time threshold plus an exact tie fix-up, not a full sort.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    keep = flat >= threshold
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # ties at the threshold: keep the lowest indices, drop the highest
        tie_index = torch.nonzero(flat == threshold).squeeze(1)
        keep[tie_index[tie_index.numel() - extra :]] = False
    return keep.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n_keep`` largest of every ``m`` consecutive inputs of each row."""
    out_features, in_features = scores.shape
    groups = scores.reshape(out_features, in_features // m, m)
    if m <= 8:
        # rank of each entry in its group by pairwise comparison (m² cheap elementwise ops, no sort):
        # rank_j = #{i : s_i > s_j, or s_i == s_j and i < j}; keep rank < n_keep.
        # The m positions are first made contiguous planes: strided compares are ~2× slower.
        planes = groups.permute(2, 0, 1).contiguous()
        mask = torch.empty_like(groups, dtype=torch.bool)
        rank = torch.empty_like(planes[0], dtype=torch.uint8)
        for j in range(m):
            rank.zero_()
            for i in range(m):
                if i != j:
                    rank += planes[i] >= planes[j] if i < j else planes[i] > planes[j]
            torch.lt(rank, n_keep, out=mask[..., j])
        return mask.reshape(out_features, in_features)
    # stable descending sort: among ties the lower index comes first
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n_keep]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(out_features, in_features)


def row_topk_mask(scores: torch.Tensor, k_per_row: int) -> torch.Tensor:
    """Bool mask keeping the ``k_per_row`` largest entries of every row (Wanda's comparison group)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k_per_row]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask


def mask_for(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Projection of SPEC §2: the support of ``P(scores)`` — layer-wide top-k or N:M per group."""
    if spec.is_nm:
        return nm_mask(scores, spec.n_keep, spec.m)
    return topk_mask(scores, spec.n_kept(*scores.shape))


def project(x: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """``P(x)``: keep the entries of ``x`` with the largest magnitude under ``spec``, zero the rest."""
    return x * mask_for(x.abs(), spec)


def pattern_ok(mask: torch.Tensor, spec: SparsitySpec) -> bool:
    """True if ``mask`` has exactly the kept count (unstructured) or at most N per group (N:M)."""
    if spec.is_nm:
        out_features, in_features = mask.shape
        per_group = mask.reshape(out_features, in_features // spec.m, spec.m).sum(-1)
        return bool((per_group <= spec.n_keep).all())
    return int(mask.sum()) == spec.n_kept(*mask.shape)


# float64 elements of one row slab (32 MiB) for the float64 passes over a layer's weight (the error
# report, the dense-target reduction): the slabs' products are big enough to run at matmul speed and
# small next to a large layer's out·in
ROW_SLAB_ELEMENTS = 1 << 22


def row_slabs(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` row ranges of about :data:`ROW_SLAB_ELEMENTS` elements each."""
    rows = max(1, ROW_SLAB_ELEMENTS // max(in_features, 1))
    return [(r0, min(out_features, r0 + rows)) for r0 in range(0, out_features, rows)]


def relative_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr((Ŵ−W) G (Ŵ−W)ᵀ) / tr(Ŵ G Ŵᵀ)`` with the undamped gram ``G`` (SPEC §1), in float64.

    Computed a slab of rows of ``W`` at a time, each slab and its products in float64 (each row's
    quadratic form is independent, so the sums are the same up to float64 rounding): the extra memory
    is a few ``rows × in`` float64 slabs, not four ``out × in`` float64 copies (≈ 7.5 GiB at a 70B
    down_proj). A float64 ``G`` (a :class:`~alpsprune.stats.Gram`'s) is used as stored; any other dtype
    is widened a slab of columns at a time, so no float64 ``in × in`` copy is made either.
    """
    G = gram.G if hasattr(gram, "G") else gram  # accept a Gram object too
    out_features, in_features = dense.shape
    slabs = row_slabs(out_features, in_features)
    # column slabs of G: all of it when it is float64 already (a view, no copy)
    col_slabs = [(0, in_features)] if G.dtype == torch.float64 else row_slabs(in_features, in_features)
    num = torch.zeros((), dtype=torch.float64, device=G.device)
    den = torch.zeros((), dtype=torch.float64, device=G.device)
    for c0, c1 in col_slabs:
        G_cols = G[:, c0:c1].to(torch.float64)
        for r0, r1 in slabs:
            W_hat = dense[r0:r1].to(device=G.device, dtype=torch.float64)
            delta = W_hat - pruned[r0:r1].to(device=G.device, dtype=torch.float64)
            num += torch.linalg.vecdot(delta @ G_cols, delta[:, c0:c1]).sum()
            den += torch.linalg.vecdot(W_hat @ G_cols, W_hat[:, c0:c1]).sum()
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return float(num / den)
