"""DSnoT (Zhang et al., "Dynamic Sparse No Training", ICLR 2024; SPEC §3): mask refinement only.

Start from the Wanda mask and never change a weight's value. For output row ``i`` the expected
output error of the mask is

    ε_i = Σ_j (1 − M_ij) · Ŵ_ij · E[x_j]          (E[x] = ``gram.mean``)

i.e. the expected dense output minus the expected sparse output. Each cycle, every still-active
row swaps one pruned weight in and one kept weight out, all rows at once (a loop over cycles,
vectorised over rows):

* **grow** — among the row's pruned weights whose contribution ``c_ij = Ŵ_ij E[x_j]`` has the
  sign of ``ε_i`` (growing it moves ``ε_i`` towards 0), the one with the largest
  ``|c_ij| / Var[x_j]^pow_of_var`` (the reduction expected, relative to how much it varies
  over the inputs; ``Var[x] = gram.var``).
* **prune** — among the row's kept weights whose contribution has the sign opposite to ``ε_i``
  (removing it also moves ``ε_i`` towards 0), the one with the smallest Wanda score
  ``|Ŵ_ij|·‖X_j‖``. For N:M the candidate must lie in the grown weight's group, so every group
  keeps exactly its N; if that group holds no opposite-sign kept weight, its smallest-Wanda kept
  weight is taken (as the authors' N:M code does).
* the swap is applied only if it strictly lowers ``|ε_i|`` (the authors' code can overshoot and
  flip the sign; requiring descent makes the result never worse than Wanda's in ``|ε|`` and
  rules out cycling). A row whose swap is refused, or whose ``|ε_i|`` falls under
  ``threshold``, or that runs out of candidates, stops for good (as in the authors' code).

Swaps are one-in-one-out within a row (and within a group for N:M), so the per-row counts — and
hence the exact layer total of the Wanda mask — never change. Without an input mean (a plain
``G`` tensor carries none) every ``ε_i`` is 0 and the result is the Wanda mask.
"""

from __future__ import annotations

import torch

from ..sparsity import SparsitySpec
from ..stats import Gram
from .base import register
from .wanda import solve_wanda, wanda_scores


def row_errors(W_hat: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``ε_i = Σ_j (1 − M_ij) Ŵ_ij E[x_j]`` for every row, float64."""
    contrib = W_hat.to(torch.float64) * mean.to(device=W_hat.device, dtype=torch.float64)[None, :]
    return (contrib * (~mask)).sum(1)


@register("dsnot")
def solve_dsnot(
    W_hat: torch.Tensor,
    gram: Gram,
    spec: SparsitySpec,
    *,
    max_cycles: int = 50,
    threshold: float = 0.1,
    pow_of_var: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DSnoT on top of Wanda.

    :param max_cycles: swap cycles per row at most (paper: 50).
    :param threshold: a row stops once ``|ε_i|`` is below this (paper: 0.1).
    :param pow_of_var: exponent of ``Var[x_j]`` in the grow criterion (paper: 1; 0 ignores variance).
    """
    if max_cycles < 0:
        raise ValueError(f"max_cycles must be >= 0, got {max_cycles}")
    _, mask, _ = solve_wanda(W_hat, gram, spec)
    mask = mask.clone()
    out_features, in_features = W_hat.shape
    device = W_hat.device
    mean = gram.mean.to(device=device, dtype=torch.float64)
    contrib = W_hat.to(torch.float64) * mean[None, :]
    var = gram.var.to(device=device, dtype=torch.float64)
    # zero variance (constant input) gives an exactly predictable reduction: rank it first, finitely
    tiny = torch.finfo(torch.float64).tiny
    grow_weight = var.clamp_min(tiny).pow(-pow_of_var) if pow_of_var else torch.ones_like(var)
    grow_ratio = contrib.abs() * grow_weight[None, :]
    wanda = wanda_scores(W_hat, gram).to(torch.float64)
    eps = (contrib * (~mask)).sum(1)
    eps_start = eps.abs().clone()

    rows = torch.arange(out_features, device=device)
    active = eps.abs() >= threshold
    cycles = swaps = 0
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        cycles += 1
        sign = torch.sign(eps)[:, None]
        same = contrib * sign > 0  # growing moves ε towards 0 / pruning would move it away
        opposite = contrib * sign < 0
        # grow: pruned, same sign, largest |c|/Var^p (argmax returns the lowest index among ties)
        grow_score = torch.where(~mask & same, grow_ratio, -inf)
        g = grow_score.argmax(1)
        has_grow = torch.isfinite(grow_score[rows, g])
        # prune: kept, opposite sign, smallest Wanda score
        prune_score = torch.where(mask & opposite, wanda, inf)
        if spec.is_nm:
            in_group = (torch.arange(in_features, device=device)[None, :] // spec.m) == (g // spec.m)[:, None]
            group_opp = torch.where(in_group, prune_score, inf)
            group_any = torch.where(in_group & mask, wanda, inf)
            has_opp = torch.isfinite(group_opp.min(1).values)
            prune_score = torch.where(has_opp[:, None], group_opp, group_any)
        p = prune_score.argmin(1)
        has_prune = torch.isfinite(prune_score[rows, p])
        new_eps = eps - contrib[rows, g] + contrib[rows, p]
        do = active & has_grow & has_prune & (new_eps.abs() < eps.abs())
        idx = rows[do]
        mask[idx, g[do]] = True
        mask[idx, p[do]] = False
        eps = torch.where(do, new_eps, eps)
        swaps += int(do.sum())
        active = do & (eps.abs() >= threshold)

    info = {
        "cycles": cycles,
        "swaps": swaps,
        "mean_abs_error_start": float(eps_start.mean()) if out_features else 0.0,
        "mean_abs_error_end": float(eps.abs().mean()) if out_features else 0.0,
    }
    return W_hat * mask, mask, info
