"""Non-uniform per-layer sparsity at a fixed overall sparsity (issue 9).

:func:`allocate` returns ``{full layer name: sparsity}`` for every targeted layer, ready for
``prune_model(..., allocation=...)``. Two modes:

``owl``
    OWL, "Outlier Weighed Layerwise sparsity" (Yin et al. 2023, arXiv 2310.05175). Per decoder
    block, the Wanda scores ``|W_ij|·‖X_j‖₂`` of all its target linears are pooled; the block's
    outlier ratio ``D_l`` is the fraction of scores above ``M ×`` their mean (as the authors' code
    does: one threshold per block, over the concatenated scores). The ratios are min-max scaled to
    ``[0, 2λ]`` and the block *density* is ``(1 − s) + (scaled_l − mean(scaled))``: more outliers →
    lower sparsity, spread ``2λ``, mean (weighted by parameter count, so the total is exact for any
    architecture) equal to ``s``. Every layer of a block gets the block's sparsity. Defaults
    ``M = 5``, ``λ = 0.08`` (the paper's LLaMA setting). Only ``diag(XᵀX)`` is needed.

``curve``
    Measured error curves. Every target layer is solved at a few sparsities around ``s`` (default
    5 points spanning the bounds) on the Gram of its *dense-model* inputs, recording the relative
    reconstruction error ``e_l(s)``. The allocation minimises ``Σ_l w_l·e_l(s_l)`` subject to the
    kept-weight budget: for a multiplier ``μ`` each layer independently picks, on a fine grid, the
    ``s`` minimising ``w_l·e_l(s) + μ·kept_l(s)`` (``e_l`` interpolated piecewise-linearly in
    ``log e``); ``μ`` is found by bisection, the leftover (less than one grid step of one layer)
    goes to the layers with the best marginal gain per weight. ``w_l = 1`` by default
    (``curve_weights="size"`` uses ``w_l ∝`` parameter count). The curves are measured with
    ``curve_method`` (default: SparseGPT when ``method`` is ALPS — an ALPS curve costs ~5 full ALPS
    prunes, SparseGPT's a small fraction of one; both rank layers alike, see the bench note).

Approximations (documented): statistics come from the *dense* model for every block (no pruning
during allocation), so later blocks see undistorted inputs; curve errors are per-layer relative
errors, which treat a unit of relative error alike in every layer.

Exactness: the pipeline keeps ``round((1 − s_l)·out·in)`` weights per layer. The allocation first
fixes integer kept counts ``k_l`` whose sum equals the *uniform* total ``Σ_l round((1 − s)·n_l)``
exactly (which is itself within half a weight per layer of ``round((1 − s)·Σ n_l)``), then returns
``s_l = 1 − k_l/n_l``, whose rounding reproduces ``k_l``. Bounds: ``s_l ∈ [min_sparsity,
max_sparsity]``, default ``[max(0, s − 0.2), min(0.95, s + 0.2)]``; integer counts stay inside them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import AlpsPruneError
from .models import (
    find_decoder_blocks,
    find_target_linears,
    get_weight,
    input_hooks,
    run_block,
)
from .parallel import Parallel, single_process
from .solvers import prune_layer, solver_options
from .stats import Gram
from .streaming import ActivationStream, Placement, capture_stream, resolve_device, visiting

log = logging.getLogger("alpsprune")

MODES = ("owl", "curve")
DEFAULT_SPREAD = 0.2  # default bounds: s ± 0.2, clipped to [0, MAX_DEFAULT]
MAX_DEFAULT = 0.95


# ---- pure maths ----------------------------------------------------------------------------------


def default_bounds(sparsity: float, min_sparsity: float | None = None, max_sparsity: float | None = None):
    """``(lo, hi)``: given values, else ``max(0, s − 0.2)`` and ``min(0.95, s + 0.2)``; checks ``lo ≤ s ≤ hi``."""
    lo = max(0.0, sparsity - DEFAULT_SPREAD) if min_sparsity is None else float(min_sparsity)
    hi = (
        max(sparsity, min(MAX_DEFAULT, sparsity + DEFAULT_SPREAD))
        if max_sparsity is None
        else float(max_sparsity)
    )
    if not (0.0 <= lo <= sparsity <= hi < 1.0):
        raise AlpsPruneError(
            f"sparsity bounds must satisfy 0 ≤ min_sparsity ≤ sparsity ≤ max_sparsity < 1; got "
            f"{lo} ≤ {sparsity} ≤ {hi}"
        )
    return lo, hi


def uniform_kept(sizes: Sequence[int], sparsity: float) -> int:
    """Weights the uniform allocation keeps: ``Σ_l round((1 − s)·n_l)`` (the pipeline's per-layer rounding)."""
    return int(sum(round((1.0 - sparsity) * n) for n in sizes))


def _kept_limits(sizes: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer kept counts allowed by the bounds: ``n(1−hi) ≤ k ≤ n(1−lo)`` (with a tiny fp tolerance)."""
    kmin = np.ceil(sizes * (1.0 - hi) - 1e-9).astype(np.int64)
    kmax = np.floor(sizes * (1.0 - lo) + 1e-9).astype(np.int64)
    return kmin, kmax


def integer_counts(
    targets: Sequence[float],
    sizes: Sequence[int],
    total: int,
    lo: float,
    hi: float,
    priority: Sequence[float] | None = None,
) -> np.ndarray:
    """Integer kept counts ``k_l`` summing to ``total`` exactly, inside the bounds, close to ``targets``.

    Start from ``floor(target)`` clipped to the bounds, then hand out the missing weights one per layer
    in order of ``priority`` (default: the fractional part), repeating while some remain (or take away,
    if clipping overshot). Raises if ``total`` is outside what the bounds allow.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    x = np.asarray(targets, dtype=np.float64)
    kmin, kmax = _kept_limits(sizes, lo, hi)
    if not kmin.sum() <= total <= kmax.sum():
        raise AlpsPruneError(f"cannot keep {total} weights within sparsity bounds [{lo}, {hi}]")
    k = np.clip(np.floor(x).astype(np.int64), kmin, kmax)
    prio = (x - np.floor(x)) if priority is None else np.asarray(priority, dtype=np.float64)
    order = np.argsort(-prio, kind="stable")
    while k.sum() != total:
        diff = total - int(k.sum())
        step = 1 if diff > 0 else -1
        seq = order if step > 0 else order[::-1]
        for i in seq:
            if diff == 0:
                break
            if kmin[i] <= k[i] + step <= kmax[i]:
                k[i] += step
                diff -= step
    return k


def counts_to_sparsities(counts: Sequence[int], sizes: Sequence[int]) -> list[float]:
    """``s_l = 1 − k_l/n_l`` such that ``round((1 − s_l)·n_l) == k_l``; ``0.0`` exactly when all are kept."""
    out = []
    for k, n in zip(counts, sizes):
        s = 1.0 - int(k) / int(n)
        s = 0.0 if k >= n else min(max(s, 0.0), math.nextafter(1.0, 0.0))
        assert round((1.0 - s) * n) == k, (k, n, s)
        out.append(s)
    return out


def _shift_to_mean(values: np.ndarray, sizes: np.ndarray, target: float, lo: float, hi: float) -> np.ndarray:
    """Add one constant ``t`` to all ``values`` so that the size-weighted mean of ``clip(v + t, lo, hi)``
    equals ``target`` (bisection; the clipped mean is monotone in ``t``)."""
    w = sizes / sizes.sum()

    def mean(t: float) -> float:
        return float((np.clip(values + t, lo, hi) * w).sum())

    a, b = lo - values.max() - 1.0, hi - values.min() + 1.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if mean(m) < target:
            a = m
        else:
            b = m
    return np.clip(values + 0.5 * (a + b), lo, hi)


def owl_block_sparsities(
    outlier_ratios: Sequence[float],
    param_counts: Sequence[int],
    sparsity: float,
    lam: float = 0.08,
    bounds: tuple[float, float] | None = None,
) -> list[float]:
    """OWL's block sparsities (continuous): higher outlier ratio → lower sparsity.

    Ratios are min-max scaled to ``[0, 2·lam]``; block ``l`` gets ``s − (scaled_l − mean)`` with the
    mean weighted by ``param_counts``, so ``Σ n_l s_l = s·Σ n_l``. If bounds clip some blocks, one
    common shift restores the weighted mean. Equal ratios give the uniform allocation.
    """
    r = np.asarray(outlier_ratios, dtype=np.float64)
    n = np.asarray(param_counts, dtype=np.float64)
    if r.shape != n.shape or r.ndim != 1 or r.size == 0:
        raise ValueError("outlier_ratios and param_counts must be 1-D sequences of equal, non-zero length")
    lo, hi = bounds if bounds is not None else default_bounds(sparsity)
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2.0 * lam) if span > 0 else np.zeros_like(r)
    s = sparsity - (scaled - (scaled * n).sum() / n.sum())
    return _shift_to_mean(s, n, sparsity, lo, hi).tolist()


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """Fraction of entries of ``scores`` above ``m ×`` their mean (OWL's layerwise outlier distribution)."""
    scores = scores.reshape(-1).to(torch.float64)
    return float((scores > m * scores.mean()).sum()) / scores.numel()


class Curve:
    """A measured error curve ``e(s)``, interpolated piecewise-linearly in ``log e`` (flat outside)."""

    def __init__(self, sparsities: Sequence[float], errors: Sequence[float]):
        s = np.asarray(sparsities, dtype=np.float64)
        e = np.asarray(errors, dtype=np.float64)
        order = np.argsort(s)
        self.s = s[order]
        self.log_e = np.log(np.maximum(e[order], 1e-12))

    def __call__(self, s) -> np.ndarray:
        return np.exp(np.interp(s, self.s, self.log_e))


def lagrangian_allocation(
    curves: Sequence[Callable[[np.ndarray], np.ndarray] | Curve],
    sizes: Sequence[int],
    sparsity: float,
    bounds: tuple[float, float] | None = None,
    weights: Sequence[float] | None = None,
    grid_step: float = 0.0025,
) -> list[float]:
    """Per-layer sparsities minimising ``Σ w_l·e_l(s_l)`` with ``Σ_l kept_l`` = the uniform total, exactly.

    ``curves[l]`` maps an array of sparsities to errors (e.g. a :class:`Curve`). Lagrangian search: for
    ``μ`` each layer picks, on a grid of step ``grid_step`` within the bounds, the ``s`` minimising
    ``w_l·e_l(s) + μ·n_l·(1 − s)``; bisection on ``log μ`` brings the kept total just under the budget;
    the remainder goes, in pieces of at most one grid step, to the layers whose error drops most per
    added weight; finally counts are made integers (:func:`integer_counts`).
    """
    n = np.asarray(sizes, dtype=np.float64)
    L = len(n)
    if len(curves) != L or L == 0:
        raise ValueError("need one curve per layer and at least one layer")
    lo, hi = bounds if bounds is not None else default_bounds(sparsity)
    w = np.ones(L) if weights is None else np.asarray(weights, dtype=np.float64)
    budget = uniform_kept(sizes, sparsity)
    steps = max(1, int(round((hi - lo) / grid_step)))
    grid = np.linspace(lo, hi, steps + 1)
    cost = np.stack([w[i] * np.asarray(curves[i](grid), dtype=np.float64) for i in range(L)])  # (L, G)
    kept = n[:, None] * (1.0 - grid[None, :])  # (L, G)
    scale = float(np.median(cost)) / float(n.mean()) or 1.0  # μ's natural scale (error per weight)

    def choose(mu: float) -> np.ndarray:
        # ties → the higher sparsity (last index) so that kept(μ) is monotone non-increasing in μ
        obj = cost + mu * kept
        return obj.shape[1] - 1 - np.argmin(obj[:, ::-1], axis=1)

    def total(idx: np.ndarray) -> float:
        return float(kept[np.arange(L), idx].sum())

    a, b = -60.0, 60.0  # log μ/scale; μ→0 keeps the most, μ→∞ the least
    for _ in range(120):
        m = 0.5 * (a + b)
        if total(choose(scale * math.exp(m))) > budget:
            a = m
        else:
            b = m
    idx = choose(scale * math.exp(b))  # kept ≤ budget
    s = grid[idx].astype(np.float64)
    deficit = budget - float((n * (1.0 - s)).sum())
    # hand out the remainder: best error decrease per added weight, one grid step at most per move
    while deficit > 1e-6:
        cand = np.where(s > lo + 1e-12)[0]
        if cand.size == 0:
            break
        down = np.maximum(s[cand] - grid_step, lo)
        gain = (w[cand] * (_eval(curves, cand, s[cand]) - _eval(curves, cand, down))) / (
            n[cand] * (s[cand] - down)
        )
        j = int(np.argmax(gain))
        i = cand[j]
        room = n[i] * (s[i] - down[j])
        take = min(room, deficit)
        s[i] -= take / n[i]
        deficit -= take
    targets = n * (1.0 - s)
    marginal = [
        float(w[i] * (curves[i](np.array([s[i]]))[0] - curves[i](np.array([max(s[i] - 1.0 / n[i], lo)]))[0]))
        for i in range(L)
    ]
    k = integer_counts(targets, sizes, budget, lo, hi, priority=marginal)
    return counts_to_sparsities(k, sizes)


def _eval(curves, idx: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.array([float(np.asarray(curves[i](np.array([v])))[0]) for i, v in zip(idx, s)])


def exact_allocation(
    continuous: Sequence[float], sizes: Sequence[int], sparsity: float, bounds: tuple[float, float]
) -> list[float]:
    """Round continuous per-layer sparsities to ones whose kept counts sum to the uniform total exactly."""
    n = np.asarray(sizes, dtype=np.float64)
    targets = n * (1.0 - np.asarray(continuous, dtype=np.float64))
    k = integer_counts(targets, sizes, uniform_kept(sizes, sparsity), *bounds)
    return counts_to_sparsities(k, sizes)


# ---- model side ----------------------------------------------------------------------------------


def _dense_block_pass(
    block: nn.Module,
    layers: dict[str, nn.Module],
    hidden: ActivationStream,
    kwargs_of: Callable[[int], dict],
    device: torch.device,
    full: bool,
    parallel: Parallel,
) -> dict[str, Gram | torch.Tensor]:
    """Run the dense block on every batch, replacing each by the block's output (in place); return
    per-layer statistics summed over every rank's batches.

    ``full``: one :class:`Gram` per distinct input tensor (layers reading the same tensor — q/k/v,
    gate/up — share the object, so factorisations are shared), else ``Σ x_j²`` (float64), likewise
    computed once per distinct input tensor. The squares are summed batch by batch in the order of
    the whole calibration set (each rank's per-batch sums are gathered first), so any number of
    ranks gives the single process's result bit for bit.
    """
    grams: dict[str, Gram] = {}
    squares: dict[str, list[torch.Tensor]] = {}  # per batch, for the ordered sum over ranks
    owner: dict[str, str] = {}  # layer → the layer whose statistics it shares
    seen: dict[tuple, str] = {}
    alive: list[torch.Tensor] = []  # inputs of this pass, kept so their storage cannot be reused

    def record(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
        alive.append(x)
        if name not in owner:  # decided on the first batch
            owner[name] = seen.setdefault(key, name)
        if owner[name] != name:  # the statistics of this tensor are already being gathered
            return
        x2 = x.reshape(-1, x.shape[-1])
        if full:
            grams.setdefault(name, Gram(x.shape[-1], device=device)).add_batch(x2)
        else:
            squares.setdefault(name, []).append(x2.to(torch.float64).pow(2).sum(0))

    with input_hooks(layers, record), torch.no_grad():
        for b in range(len(hidden)):
            seen.clear()
            alive.clear()
            hidden.put(b, run_block(block, hidden.fetch(b), kwargs_of(b)))
    alive.clear()
    if full:
        parallel.all_reduce_grams(grams)
        stats: dict[str, Gram | torch.Tensor] = dict(grams)
    else:
        # per layer, in the same order on every rank (a rank whose batches never reached a layer,
        # e.g. an unrouted expert, still takes part with no rows)
        stats = {}
        for name, module in layers.items():
            mine = squares.get(owner.get(name, ""), [])
            width = get_weight(module).shape[1]
            rows = torch.stack(mine) if mine else torch.zeros(0, width, dtype=torch.float64, device=device)
            total = None
            for row in parallel.all_gather_rows(rows):  # the single process's left-to-right sum
                total = row if total is None else total + row
            if total is not None:
                stats[name] = total
        return stats
    return {name: stats[owner[name]] for name in layers if name in owner}


def allocate(
    mode: str,
    model: nn.Module,
    calibration: torch.Tensor,
    sparsity: float,
    *,
    method: str = "alps",
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    min_sparsity: float | None = None,
    max_sparsity: float | None = None,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    curve_method: str | None = None,
    curve_points: int = 5,
    curve_weights: str = "uniform",
    batch_size: int = 1,
    offload_activations: bool | str = False,
    offload_dir=None,
    parallel: Parallel | None = None,
    **solver_opts,
) -> dict[str, float]:
    """Per-layer sparsities (full dotted name → fraction pruned) for every targeted layer.

    The kept weights over all targeted layers sum exactly to the uniform allocation's
    ``Σ round((1 − s)·n_l)``; each layer's sparsity lies in ``[min_sparsity, max_sparsity]``
    (default ``[max(0, s − 0.2), min(0.95, s + 0.2)]``). The model is not modified.

    :param mode: ``"owl"`` (outlier ratio per block) or ``"curve"`` (measured error curves); see the
        module docstring. ``"uniform"`` returns ``s`` for every layer.
    :param calibration: LongTensor ``(nsamples, seqlen)`` of token ids (same as for ``prune_model``).
    :param method: the pruning method the allocation is for (the curve solver by default, except that
        ALPS curves are measured with SparseGPT unless ``curve_method`` says otherwise).
    :param owl_m: OWL's outlier threshold ``M`` (× the block's mean Wanda score).
    :param owl_lambda: OWL's ``λ``: block sparsities spread over ``2λ``.
    :param curve_method: solver used for the curves (default ``sparsegpt`` for ``alps``, else ``method``).
    :param curve_points: sparsities per curve, evenly spaced over the bounds (``s`` is always one).
    :param curve_weights: ``"uniform"`` (w_l = 1) or ``"size"`` (w_l ∝ parameter count).
    :param offload_activations: where the activation stream lives (as for ``prune_model``).
    :param parallel: distributed context: each rank streams its share of the calibration windows
        (as ``prune_model`` does) and the statistics are summed over ranks; every rank gets the
        same allocation, equal to the single process's.
    :param solver_opts: options of ``method``; those the curve solver also accepts are passed on.
    """

    if mode == "evo":  # searched allocation (EvoPress-style), in its own module
        from .evo import evo_allocation

        return evo_allocation(
            model, calibration, sparsity, method=method, targets=targets, ignore=ignore,
            device=device, progress=progress, **solver_opts,
        )  # fmt: skip
    if mode not in (*MODES, "uniform"):
        raise AlpsPruneError(f"allocation mode must be one of uniform, {', '.join(MODES)}; got {mode!r}")
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise AlpsPruneError(
            f"allocation needs an unstructured sparsity (a number), got {sparsity!r}"
        ) from None
    bounds = default_bounds(sparsity, min_sparsity, max_sparsity)
    if curve_weights not in ("uniform", "size"):
        raise AlpsPruneError(f"curve_weights must be 'uniform' or 'size', got {curve_weights!r}")
    targets = [targets] if isinstance(targets, str) else targets
    ignore = [ignore] if isinstance(ignore, str) else ignore
    path, blocks = find_decoder_blocks(model)
    layers = [find_target_linears(b, f"{path}.{i}", targets, ignore) for i, b in enumerate(blocks)]
    names = [n for bl in layers for n in bl]
    if not names:
        raise AlpsPruneError("targets/ignore select no layer to allocate sparsity to")
    sizes = [get_weight(m).numel() for bl in layers for m in bl.values()]
    if mode == "uniform":
        return dict.fromkeys(names, sparsity)

    curve_method = curve_method or ("sparsegpt" if method == "alps" else method)
    curve_opts = {}
    if mode == "curve":
        allowed = solver_options(curve_method)
        curve_opts = {k: v for k, v in solver_opts.items() if k in allowed}
        if curve_points < 2:
            raise AlpsPruneError("curve_points must be at least 2")
    device = resolve_device(device)
    parallel = parallel or single_process()
    placement = Placement.make(device, offload_activations, offload_dir)
    t0 = time.perf_counter()
    with torch.no_grad():
        inputs = capture_stream(model, parallel.shard(calibration, batch_size), placement, batch_size)
    hidden = inputs.hidden
    lo, hi = bounds
    points = sorted({*np.linspace(lo, hi, curve_points).tolist(), sparsity})
    ratios: list[float] = []
    block_sizes: list[int] = []
    curves: dict[str, Curve] = {}
    bar = tqdm(total=len(blocks), desc=f"allocation ({mode})", unit="block", disable=not progress)
    try:
        for index, block in enumerate(blocks):
            block_layers = layers[index]
            with visiting(block, device, writes=False):  # the dense model: read only
                stats = _dense_block_pass(
                    block,
                    block_layers,
                    hidden,
                    lambda b, i=index: inputs.kwargs_for(i, b),
                    device,
                    full=mode == "curve",
                    parallel=parallel,
                )
            if block_layers and mode == "owl":
                scores = [  # Wanda scores |W_ij|·‖X_j‖₂; a layer the pass never reached scores 0
                    get_weight(m).detach().to(device, torch.float64).abs()
                    * stats.get(
                        n, torch.zeros(get_weight(m).shape[1], dtype=torch.float64, device=device)
                    ).sqrt()[None, :]
                    for n, m in block_layers.items()
                ]
                ratios.append(outlier_ratio(torch.cat([s.reshape(-1) for s in scores]), owl_m))
                block_sizes.append(sum(get_weight(m).numel() for m in block_layers.values()))
            elif block_layers:
                for n, m in block_layers.items():
                    if n not in stats:  # never reached (e.g. an unrouted expert): no error at any sparsity
                        curves[n] = Curve(points, [0.0] * len(points))
                        continue
                    W = get_weight(m).detach().to(device)
                    errs = [
                        prune_layer(W, stats[n], curve_method, sparsity=p, **curve_opts).error for p in points
                    ]
                    curves[n] = Curve(points, errs)
                    bar.set_postfix_str(n.rsplit(".", 1)[-1])
                for g in {id(g): g for g in stats.values()}.values():
                    g.free()
            bar.update(1)
    finally:
        bar.close()

    if mode == "owl":
        block_s = owl_block_sparsities(ratios, block_sizes, sparsity, owl_lambda, bounds)
        per_layer = [s for s, bl in zip(block_s, (b for b in layers if b)) for _ in bl]
        result = exact_allocation(per_layer, sizes, sparsity, bounds)
        log.info("OWL outlier ratios per block: %s", ", ".join(f"{r:.4f}" for r in ratios))
    else:
        weights = None if curve_weights == "uniform" else np.asarray(sizes) / np.mean(sizes)
        result = lagrangian_allocation([curves[n] for n in names], sizes, sparsity, bounds, weights)
    log.info("allocation (%s) in %.1f s", mode, time.perf_counter() - t0)
    return dict(zip(names, result))
