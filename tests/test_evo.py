"""Searched allocation (``allocation="evo"``, issue 18): exact budget, determinism, the search itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_model

import alpsprune
from alpsprune.errors import AlpsPruneError
from alpsprune.evo import EvoSettings, evolve, level_range, level_switch, search_allocation
from alpsprune.models import get_weight, list_target_layers
from alpsprune.sparsity import SparsitySpec

FAST = EvoSettings(generations=6, offspring=4, stage_windows=(1, 3), fitness_seqlen=16, database_samples=3)


def calibration(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def kept(model, alloc: dict[str, float], ignore: list[str] | None = None) -> tuple[int, int]:
    """(weights the pipeline keeps under ``alloc``, weights of the targeted layers)."""
    layers = list_target_layers(model, ignore=ignore)
    assert sorted(alloc) == sorted(layers)
    return (
        sum(SparsitySpec.parse(alloc[n]).n_kept(*get_weight(m).shape) for n, m in layers.items()),
        sum(get_weight(m).numel() for m in layers.values()),
    )


# ---- pure search ---------------------------------------------------------------------------------


def test_level_range():
    assert level_range(0.7, 0.05, 0.1) == (-2, 2)
    assert level_range(0.9, 0.05, 0.1) == (-1, 2)  # capped at 0.95
    assert level_range(0.05, 0.05, 0.1) == (-2, 1)  # floored at 0


@pytest.mark.parametrize("seed", range(5))
def test_level_switch_keeps_class_sums_and_bounds(seed):
    rng = np.random.default_rng(seed)
    classes = [0, 0, 1, 0, 1, 2]  # unit 5 has no partner of its size: it never moves
    levels = np.zeros(6, dtype=np.int64)
    for _ in range(200):
        levels = level_switch(levels, classes, -2, 3, rng)
        for c in (0, 1, 2):
            assert levels[np.asarray(classes) == c].sum() == 0
        assert levels.min() >= -2 and levels.max() <= 3
    assert levels[5] == 0
    assert level_switch(np.zeros(1, dtype=np.int64), [0], -1, 1, rng) is None


def test_evolve_finds_a_separable_optimum_and_is_seeded():
    target = np.array([2, -1, 0, -1, 1, -1])  # sums to 0: reachable by level switches

    def fitness(levels, windows):
        return float(((np.asarray(levels) - target) ** 2).sum())

    settings = EvoSettings(generations=60, offspring=6, seed=3)
    best, history = evolve(fitness, 6, [0] * 6, -2, 2, settings)
    assert np.array_equal(best, target)
    assert history[0] == fitness((0,) * 6, 0) and history[-1] == 0
    assert all(a >= b for a, b in zip(history, history[1:]))  # elitist: never worse
    again, history2 = evolve(fitness, 6, [0] * 6, -2, 2, settings)
    assert np.array_equal(again, best) and history2 == history


def test_evolve_multistep_selection_uses_both_stages():
    calls = []

    def fitness(levels, windows):
        calls.append(windows)
        return float(np.abs(levels).sum())

    evolve(
        fitness, 4, [0] * 4, -1, 1, EvoSettings(generations=2, offspring=5, survivors=2, stage_windows=(1, 4))
    )
    assert calls[0] == 4  # the uniform parent, on all windows
    assert calls.count(1) >= 5 and calls.count(4) >= 3  # children on stage 1, survivors on stage 2


# ---- on a tiny model -----------------------------------------------------------------------------


def test_search_exact_deterministic_and_leaves_model_unchanged():
    model = make_tiny_model("llama")
    calib = calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = search_allocation(model, calib, 0.6, progress=False, settings=FAST)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    k, total = kept(model, first.allocation)
    uniform = sum(round(0.4 * get_weight(m).numel()) for m in list_target_layers(model).values())
    assert k == uniform and abs(k - round(0.4 * total)) <= len(first.allocation)
    assert all(0.5 - 1e-9 <= v <= 0.7 + 1e-9 for v in first.allocation.values())
    assert sum(first.levels) == 0 and first.history[-1] <= first.history[0]
    assert first.evaluations > 0
    again = search_allocation(model, calib, 0.6, progress=False, settings=FAST)
    assert again.allocation == first.allocation and again.history == first.history
    other = search_allocation(
        model, calib, 0.6, progress=False, settings=EvoSettings(**{**FAST.__dict__, "seed": 1})
    )
    assert kept(model, other.allocation)[0] == uniform


def test_search_unequal_blocks_only_trade_within_a_size_class():
    model = make_tiny_model("llama")
    model.train()  # the search scores in eval mode and gives the mode back
    calib = calibration()
    res = search_allocation(
        model,
        calib,
        0.5,
        ignore=r".*layers\.0\.mlp.*",
        progress=False,
        settings=EvoSettings(**{**FAST.__dict__, "generations": 12}),
    )
    assert model.training
    assert res.levels[0] == 0  # block 0 is smaller than the others: no partner to trade with
    assert sum(res.levels) == 0
    k, _ = kept(model, res.allocation, ignore=[r".*layers\.0\.mlp.*"])
    assert k == sum(
        round(0.5 * get_weight(m).numel())
        for m in list_target_layers(model, ignore=[r".*layers\.0\.mlp.*"]).values()
    )


def test_prune_model_with_evo_allocation_exact_total():
    model = make_tiny_model("llama")
    calib = calibration()
    report = alpsprune.prune_model(
        model, calib, sparsity=0.6, allocation="evo", method="sparsegpt", progress=False
    )
    assert report.settings["allocation"] == "evo"
    layers = list_target_layers(model)
    nnz = sum(int((get_weight(m) != 0).sum()) for m in layers.values())
    uniform = sum(round(0.4 * get_weight(m).numel()) for m in layers.values())
    assert nnz == uniform  # SparseGPT keeps exactly the allotted weights: the total is exact
    assert len({round(r.sparsity, 2) for r in report.layers}) > 1  # and the allocation is not uniform


def test_evo_errors():
    model = make_tiny_model("llama")
    with pytest.raises(AlpsPruneError, match="calibration windows"):
        search_allocation(model, calibration(n=2), 0.6, progress=False, settings=FAST)
    with pytest.raises(AlpsPruneError, match="step"):
        search_allocation(
            model, calibration(), 0.6, progress=False, settings=EvoSettings(step=0.2, max_shift=0.1)
        )
    with pytest.raises(AlpsPruneError, match="N:M"):
        alpsprune.prune_model(model, calibration(), mask_structure="2:4", allocation="evo", progress=False)
