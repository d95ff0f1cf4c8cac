"""Magnitude pruning (SPEC §3): keep the largest ``|Ŵ|``, layer-wide or per row. No weight update."""

from __future__ import annotations

import torch

from ..masks import mask_for, row_topk_mask
from ..sparsity import SparsitySpec
from ..stats import Gram
from .base import register


@register("magnitude")
def solve_magnitude(
    W_hat: torch.Tensor, gram: Gram, spec: SparsitySpec, *, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """:param per_row: rank within each output row instead of layer-wide (unstructured only)."""
    scores = W_hat.abs()
    if per_row and not spec.is_nm:
        mask = row_topk_mask(scores, spec.n_kept(1, W_hat.shape[1]))
    else:
        mask = mask_for(scores, spec)
    return W_hat * mask, mask, {}
