"""Searched per-block sparsity: an EvoPress-style evolutionary allocation (issue 18).

EvoPress (Sieberling et al., ICML 2025, arXiv 2410.14649) observes that the sum of per-layer errors
does not predict the model's error, so it *searches* the per-unit compression levels, scoring each
candidate by the KL divergence of the whole model's next-token distribution to the dense model's on
a few calibration tokens. Our version, written for this library:

* **Units and levels.** A unit is a decoder block (all its target linears share one sparsity, as in
  OWL). Level ``j`` of a unit means sparsity ``s − j·step`` (``j > 0``: denser), ``|j·step| ≤
  max_shift`` and inside ``[0, 0.95]``.
* **Exact budget.** A mutation is EvoPress's *level switch*: one unit goes one level denser and
  another unit *of the same parameter count* one level sparser, so the weighted mean sparsity stays
  exactly ``s``; the per-layer fractions are then made integer-exact by
  :func:`alpsprune.allocation.exact_allocation` (the kept weights sum to the uniform allocation's).
* **Database.** Every (block, level) is pruned once, when the search first visits it, by a fast
  solver (``database_method``, default SparseGPT) on the Grams of the *dense* model's inputs (first
  ``database_samples`` calibration windows, gathered in one pass up front); a candidate model is
  stitched from these variants (stored in float16). The winning allocation is then handed to the
  normal pipeline, which prunes with the real method.
* **Search.** (1+λ): ``offspring`` children of the parent, each with 1..``max_mutations`` level
  switches; *multi-step selection*: all children are scored on the first ``stage_windows[0]``
  fitness windows, the best ``survivors`` on all ``stage_windows[1]``, and the best survivor
  replaces the parent if it is not worse on those. Fitness = mean per-token KL(dense ‖ candidate) on
  calibration windows cut to ``fitness_seqlen`` tokens. Deterministic for a given ``seed`` (one
  numpy generator drives every random choice; the forward passes are deterministic on one device).

The search itself (:func:`evolve`) is pure: it sees only a fitness function, so it is tested on toy
fitnesses; :func:`search_allocation` wires it to a model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import AlpsPruneError
from .models import (
    find_decoder_blocks,
    find_target_linears,
    get_weight,
    set_weight,
)
from .parallel import single_process
from .solvers import prune_layer, solver_options
from .streaming import Placement, capture_stream, resolve_device, visiting

log = logging.getLogger("alpsprune")


@dataclass(frozen=True)
class EvoSettings:
    """Knobs of the search (the defaults cost about 1.5 ALPS prunes of the bundled model in CPU time)."""

    step: float = 0.05  # sparsity change per level
    max_shift: float = 0.1  # a unit's sparsity stays within s ± max_shift
    generations: int = 20
    offspring: int = 8  # λ
    survivors: int = 2  # children re-scored on all fitness windows
    max_mutations: int = 3  # level switches per child: 1..max_mutations, uniformly
    stage_windows: tuple[int, int] = (1, 4)  # fitness windows in selection steps 1 and 2
    fitness_seqlen: int = 128
    database_samples: int = 8  # calibration windows whose Grams the database solver uses
    database_method: str | None = None  # default: sparsegpt for alps, else the method itself
    seed: int = 0

    def check(self) -> None:
        if not (self.step > 0 and self.max_shift >= self.step):
            raise AlpsPruneError(
                f"evo: need step > 0 and max_shift ≥ step, got {self.step}, {self.max_shift}"
            )
        if min(self.generations, self.offspring, self.survivors, self.max_mutations) < 1:
            raise AlpsPruneError("evo: generations, offspring, survivors and max_mutations must be ≥ 1")
        if not 1 <= self.stage_windows[0] <= self.stage_windows[1]:
            raise AlpsPruneError(f"evo: stage_windows must be 1 ≤ a ≤ b, got {self.stage_windows}")


@dataclass
class EvoResult:
    """The searched allocation and how the search went."""

    allocation: dict[str, float]  # full layer name → sparsity (exact total)
    levels: list[int]  # per block, j (sparsity s − j·step)
    block_sparsity: list[float]
    history: list[float] = field(default_factory=list)  # parent fitness: uniform, then per generation
    evaluations: int = 0  # candidate-window forwards
    seconds: float = 0.0
    database_seconds: float = 0.0


# ---- pure search ---------------------------------------------------------------------------------


def level_range(sparsity: float, step: float, max_shift: float, cap: float = 0.95) -> tuple[int, int]:
    """``(jlo, jhi)``: levels with ``s − j·step`` in ``[max(0, s − max_shift), min(cap, s + max_shift)]``."""
    lo, hi = max(0.0, sparsity - max_shift), min(cap, sparsity + max_shift)
    jhi = math.floor((sparsity - lo) / step + 1e-9)
    jlo = -math.floor((hi - sparsity) / step + 1e-9)
    return jlo, jhi


def level_switch(
    levels: np.ndarray, classes: Sequence[int], jlo: int, jhi: int, rng: np.random.Generator
) -> np.ndarray | None:
    """One EvoPress level switch: a unit one level up, another unit of the same class one level down.

    Units of one class have the same parameter count, so the total is unchanged. ``None`` if no
    switch is possible.
    """
    classes = np.asarray(classes)
    options = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        up = members[levels[members] < jhi]
        down = members[levels[members] > jlo]
        if down.size == 1:  # a unit cannot trade with itself
            up = up[up != down[0]]
        if up.size and down.size:
            options.append((up, down))
    if not options:
        return None
    up, down = options[rng.integers(len(options))]
    a = up[rng.integers(up.size)]
    down = down[down != a]
    b = down[rng.integers(down.size)]
    child = levels.copy()
    child[a] += 1
    child[b] -= 1
    return child


def evolve(
    fitness: Callable[[tuple[int, ...], int], float],
    n_units: int,
    classes: Sequence[int],
    jlo: int,
    jhi: int,
    settings: EvoSettings,
    on_generation: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """(1+λ) search from the uniform allocation (all levels 0); returns the best levels and the history.

    ``fitness(levels, windows)`` is the loss of a candidate on the first ``windows`` fitness windows
    (lower is better). Multi-step selection as in the module docstring.
    """
    rng = np.random.default_rng(settings.seed)
    w1, w2 = settings.stage_windows
    parent = np.zeros(n_units, dtype=np.int64)
    parent_fit = fitness(tuple(parent.tolist()), w2)
    history = [parent_fit]  # [0]: the uniform allocation
    for gen in range(settings.generations):
        children: list[np.ndarray] = []
        for _ in range(settings.offspring):
            child = parent
            for _ in range(int(rng.integers(1, settings.max_mutations + 1))):
                nxt = level_switch(child, classes, jlo, jhi, rng)
                child = child if nxt is None else nxt
            if not np.array_equal(child, parent):
                children.append(child)
        if children:
            first = [fitness(tuple(c.tolist()), w1) for c in children]
            order = np.argsort(first, kind="stable")[: settings.survivors]
            finals = [(fitness(tuple(children[i].tolist()), w2), int(i)) for i in order]
            best_fit, best = min(finals)
            if best_fit <= parent_fit:
                parent, parent_fit = children[best], best_fit
        history.append(parent_fit)
        if on_generation is not None:
            on_generation(gen, parent_fit)
    return parent, history


# ---- model side ----------------------------------------------------------------------------------


def _kl_per_window(dense_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-window sum over tokens of KL(dense ‖ candidate); ``(windows, seq, vocab)`` inputs."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (dense_logp.exp() * (dense_logp - logq)).sum(-1).sum(-1).double()


def search_allocation(
    model: nn.Module,
    calibration: torch.Tensor,
    sparsity: float,
    *,
    method: str = "alps",
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    settings: EvoSettings | None = None,
    **solver_opts,
) -> EvoResult:
    """Search per-block sparsities for ``model`` at overall ``sparsity``; the model is left unchanged.

    :param calibration: LongTensor ``(nsamples, seqlen)``; the database Grams use the first
        ``database_samples`` windows, the fitness the first ``stage_windows[1]`` cut to
        ``fitness_seqlen`` tokens.
    :param solver_opts: options of ``method``; those the database solver accepts are passed on.
    """
    from .allocation import _dense_block_pass, default_bounds, exact_allocation  # local: no cycle

    settings = settings or EvoSettings()
    settings.check()
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise AlpsPruneError(f"allocation 'evo' needs an unstructured sparsity, got {sparsity!r}") from None
    if calibration.shape[0] < settings.stage_windows[1]:
        raise AlpsPruneError(
            f"allocation 'evo' scores candidates on {settings.stage_windows[1]} calibration windows but got "
            f"{calibration.shape[0]}; give more calibration samples (--nsamples)"
        )
    db_method = settings.database_method or ("sparsegpt" if method == "alps" else method)
    allowed = solver_options(db_method)
    db_opts = {k: v for k, v in solver_opts.items() if k in allowed}
    device = resolve_device(device)
    targets = [targets] if isinstance(targets, str) else targets
    ignore = [ignore] if isinstance(ignore, str) else ignore
    path, blocks = find_decoder_blocks(model)
    layers = [find_target_linears(b, f"{path}.{i}", targets, ignore) for i, b in enumerate(blocks)]
    units = [i for i, bl in enumerate(layers) if bl]
    if not units:
        raise AlpsPruneError("targets/ignore select no layer to allocate sparsity to")
    names = [n for bl in layers for n in bl]
    sizes = [get_weight(m).numel() for bl in layers for m in bl.values()]
    unit_sizes = [sum(get_weight(m).numel() for m in layers[i].values()) for i in units]
    classes = [sorted(set(unit_sizes)).index(n) for n in unit_sizes]
    jlo, jhi = level_range(sparsity, settings.step, settings.max_shift)
    start = time.perf_counter()

    # database: a (unit, level) is pruned once, on the dense model's inputs, when the search first needs it
    dense = {n: get_weight(m).detach().clone() for bl in layers for n, m in bl.items()}
    database: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    block_stats: dict[int, dict] = {}
    bar = tqdm(total=len(blocks), desc="evo statistics", unit="block", disable=not progress)
    placement = Placement.make(device)
    with torch.no_grad():
        inputs = capture_stream(model, calibration[: settings.database_samples], placement)
        hidden = inputs.hidden
        try:
            for index, block in enumerate(blocks):
                with visiting(block, device, writes=False):  # the dense model: read only
                    block_stats[index] = _dense_block_pass(
                        block,
                        layers[index],
                        hidden,
                        lambda b, i=index: inputs.kwargs_for(i, b),
                        device,
                        full=True,
                        parallel=single_process(),
                    )
                bar.update(1)
        finally:
            bar.close()
    db_seconds = time.perf_counter() - start

    def variant(index: int, j: int) -> dict[str, torch.Tensor]:
        nonlocal db_seconds
        if (index, j) not in database:
            t0 = time.perf_counter()
            s_j = min(max(sparsity - j * settings.step, 0.0), 0.95)
            stats, entry = block_stats[index], {}
            for n in layers[index]:
                W = dense[n].to(device)
                if n in stats and s_j > 0:
                    W = prune_layer(W, stats[n], db_method, sparsity=s_j, **db_opts).weight
                entry[n] = W.to(torch.float16).to(dense[n].device)  # a proxy: half precision is plenty
            database[(index, j)] = entry
            db_seconds += time.perf_counter() - t0
        return database[(index, j)]

    # fitness: KL to the dense model on fitness windows, candidates stitched from the database
    was_training = model.training
    model.eval()  # no dropout in the fitness (restored below)
    windows = calibration[: settings.stage_windows[1], : settings.fitness_seqlen]
    model_device = next(model.parameters()).device
    with torch.no_grad():
        dense_logp = [
            torch.log_softmax(model(windows[w : w + 1].to(model_device)).logits.float(), dim=-1)
            for w in range(windows.shape[0])
        ]
    loaded: dict[int, int | None] = dict.fromkeys(units)  # unit → level now in the model
    cache: dict[tuple[int, ...], list[float]] = {}
    evaluations = 0

    def load(levels: tuple[int, ...]) -> None:
        for u, j in zip(units, levels):
            if loaded[u] != j:
                for n, W in variant(u, j).items():
                    set_weight(layers[u][n], W.to(dense[n].dtype))
                loaded[u] = j

    def fitness(levels: tuple[int, ...], n_windows: int) -> float:
        nonlocal evaluations
        done = cache.setdefault(levels, [])
        if len(done) < n_windows:
            load(levels)
            with torch.no_grad():
                for w in range(len(done), n_windows):
                    logits = model(windows[w : w + 1].to(model_device)).logits
                    done.append(float(_kl_per_window(dense_logp[w], logits).sum()))
                    evaluations += 1
        return sum(done[:n_windows]) / (n_windows * windows.shape[1])

    bar = tqdm(total=settings.generations, desc="evo search", unit="gen", disable=not progress)
    try:
        best, history = evolve(
            fitness,
            len(units),
            classes,
            jlo,
            jhi,
            settings,
            on_generation=lambda g, f: (bar.update(1), bar.set_postfix_str(f"KL {f:.4f}")),
        )
    finally:
        bar.close()
        model.train(was_training)
        with torch.no_grad():  # the caller gets the dense model back, bit for bit
            for bl in layers:
                for n, m in bl.items():
                    set_weight(m, dense[n])
        for stats in block_stats.values():
            for g in {id(g): g for g in stats.values()}.values():
                g.free()
    block_s = [sparsity - int(j) * settings.step for j in best]
    per_layer = [s for s, u in zip(block_s, units) for _ in layers[u]]
    bounds = default_bounds(sparsity, max(0.0, min(per_layer)), max(sparsity, max(per_layer)))
    result = exact_allocation(per_layer, sizes, sparsity, bounds)
    seconds = time.perf_counter() - start
    log.info(
        "evo allocation in %.1f s (database %.1f s, %d window forwards): KL %.4f → %.4f, levels %s",
        seconds,
        db_seconds,
        evaluations,
        history[0] if history else float("nan"),
        history[-1] if history else float("nan"),
        [int(j) for j in best],
    )
    return EvoResult(
        allocation=dict(zip(names, result)),
        levels=[int(j) for j in best],
        block_sparsity=block_s,
        history=history,
        evaluations=evaluations,
        seconds=seconds,
        database_seconds=db_seconds,
    )


def evo_allocation(
    model: nn.Module, calibration: torch.Tensor, sparsity: float, **kwargs
) -> dict[str, float]:
    """:func:`search_allocation` with default :class:`EvoSettings`; returns only the allocation."""
    return search_allocation(model, calibration, sparsity, **kwargs).allocation
