"""Wanda (Sun et al. 2023; SPEC §3): score ``|Ŵ_ij|·‖X_j‖``, kept per output row. No weight update."""

from __future__ import annotations

import torch

from ..masks import mask_for, row_topk_mask
from ..sparsity import SparsitySpec
from ..stats import Gram
from .base import register


def wanda_scores(W_hat: torch.Tensor, gram: Gram) -> torch.Tensor:
    """``|Ŵ_ij| · sqrt(G_jj)`` — ``sqrt(G_jj)`` is the input feature's L2 norm over all tokens."""
    feature_norm = torch.sqrt(torch.diagonal(gram.G).clamp_min(0)).to(W_hat)
    return W_hat.abs() * feature_norm[None, :]


@register("wanda")
def solve_wanda(
    W_hat: torch.Tensor, gram: Gram, spec: SparsitySpec, *, per_row: bool = True
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """:param per_row: compare scores within each output row (Wanda's choice); False ranks layer-wide."""
    scores = wanda_scores(W_hat, gram)
    # per row, with the layer total made exact (see _exact_per_row)
    mask = _exact_per_row(scores, spec) if per_row and not spec.is_nm else mask_for(scores, spec)
    return W_hat * mask, mask, {}


def _exact_per_row(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Per-row top-k whose total equals the layer-wide kept count exactly.

    Every row keeps ``floor(k/out)``; the ``k mod out`` leftover slots go to the rows whose next
    candidate scores highest (deterministic), so the layer still has exactly ``k`` weights.
    """
    out_features, in_features = scores.shape
    k = spec.n_kept(out_features, in_features)
    base, extra = divmod(k, out_features)
    mask = row_topk_mask(scores, base)
    if extra:
        order = torch.sort(scores, dim=-1, descending=True, stable=True)
        next_best = order.values[:, base]
        rows = torch.sort(next_best, descending=True, stable=True).indices[:extra]
        mask[rows, order.indices[rows, base]] = True
    return mask
