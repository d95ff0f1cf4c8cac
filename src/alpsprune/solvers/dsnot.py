"""DSnoT (Zhang et al., "Dynamic Sparse No Training", ICLR 2024; SPEC §3): mask refinement only.

Start from the Wanda mask and never change a weight's value. For output row ``i`` the expected
output error of the mask is

    ε_i = Σ_j (1 − M_ij) · Ŵ_ij · E[x_j]          (E[x] = ``gram.mean``)

i.e. the expected dense output minus the expected sparse output. Each cycle, every still-active
row swaps one pruned weight in and one kept weight out, all rows at once (a loop over cycles,
vectorised over rows):

* **prune** — among the row's kept weights whose contribution ``c_ij = Ŵ_ij E[x_j]`` has the
  sign opposite to ``ε_i`` (removing it moves ``ε_i`` towards 0), the one with the smallest
  Wanda score ``|Ŵ_ij|·‖X_j‖``. For N:M the candidate must lie in the grown weight's group, so
  every group keeps exactly its N; if that group holds no opposite-sign kept weight, its
  smallest-Wanda kept weight is taken (as the authors' N:M code does).
* **grow** — among the row's pruned weights whose contribution has the sign of ``ε_i``
  (growing it moves ``ε_i`` towards 0), the one with the largest ``|c_ij| / Var[x_j]^pow_of_var``
  (the expected reduction relative to how much that input varies; ``Var[x] = gram.var``) —
  restricted to the weights for which the swap with the prune candidate strictly lowers
  ``|ε_i|``. The authors' code takes the top one regardless and may overshoot past zero; this
  restriction makes every swap a descent step on ``|ε_i|`` (never worse than Wanda, no
  cycling) without stopping a row merely because its top candidate is too large.
* a row stops for good when ``|ε_i| < threshold`` or no admissible swap is left, and after
  ``max_cycles`` cycles in any case.

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

    active = torch.nonzero(eps.abs() >= threshold).squeeze(1)  # rows still being refined
    cycles = swaps = 0
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    for _ in range(max_cycles):
        if active.numel() == 0:
            break
        cycles += 1
        n_active = active.numel()
        local_rows = torch.arange(n_active, device=device)
        m, c, e = mask[active], contrib[active], eps[active]
        sign = torch.sign(e)[:, None]
        # prune candidate, for a grow at any column j: kept, contribution of the sign opposite to
        # ε_i, smallest Wanda score -- row-wide (unstructured) or within j's group (N:M)
        prune_score = torch.where(m & (c * sign < 0), wanda[active], inf)
        if spec.is_nm:
            groups = (n_active, in_features // spec.m, spec.m)
            opp = prune_score.reshape(groups)
            fallback = torch.where(m, wanda[active], inf).reshape(groups)  # no opposite-sign kept weight
            cand = torch.where(torch.isfinite(opp.min(-1, keepdim=True).values), opp, fallback)
            best, local = cand.min(-1)
            first = torch.arange(groups[1], device=device)[None, :] * spec.m
            p_col = (local + first).repeat_interleave(spec.m, dim=1)
            p_ok = torch.isfinite(best).repeat_interleave(spec.m, dim=1)
        else:
            best, p = prune_score.min(1)
            p_col = p[:, None].expand(n_active, in_features)
            p_ok = torch.isfinite(best)[:, None].expand(n_active, in_features)
        # grow: pruned, contribution with the sign of ε_i, and the swap must lower |ε_i|; among
        # those the largest |c|/Var^p (argmax takes the lowest index among ties)
        new_eps_all = e[:, None] - c + c.gather(1, p_col)
        admissible = ~m & (c * sign > 0) & p_ok & (new_eps_all.abs() < e.abs()[:, None])
        grow_score = torch.where(admissible, grow_ratio[active], -inf)
        g = grow_score.argmax(1)
        do = torch.isfinite(grow_score[local_rows, g])
        rows_do = active[do]
        mask[rows_do, g[do]] = True
        mask[rows_do, p_col[local_rows, g][do]] = False
        eps[rows_do] = new_eps_all[local_rows, g][do]
        swaps += int(do.sum())
        active = rows_do[eps[rows_do].abs() >= threshold]

    info = {
        "cycles": cycles,
        "swaps": swaps,
        "mean_abs_error_start": float(eps_start.mean()) if out_features else 0.0,
        "mean_abs_error_end": float(eps.abs().mean()) if out_features else 0.0,
    }
    return W_hat * mask, mask, info
