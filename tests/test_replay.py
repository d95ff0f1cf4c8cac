"""Replaying the finished parts of a block (models/replay.py): exact, and really skipping work."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import make_tiny_model
from torch import nn

import alpsprune
from alpsprune.models.replay import BlockReplay


class ToyBlock(nn.Module):
    """norm → a → relu → b → c, with a residual; ``twice`` calls ``b`` two times (like a shared expert)."""

    def __init__(self, width: int = 8, twice: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.a, self.b, self.c = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.twice = twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(self.norm(x))))
        if self.twice:
            h = self.b(h)
        return x + self.c(h)


def toy(twice: bool = False) -> tuple[ToyBlock, dict[str, nn.Module], list[torch.Tensor]]:
    torch.manual_seed(0)
    block = ToyBlock(twice=twice)
    return block, {"a": block.a, "b": block.b, "c": block.c}, [torch.randn(3, 8) for _ in range(2)]


def run_pass(block: ToyBlock, replay: BlockReplay, stream, pruned: set[str], record: bool = True):
    outputs = []
    with replay.reusing(pruned, len(stream), record=record), torch.no_grad():
        for b, x in enumerate(stream):
            replay.batch = b
            outputs.append(block(x))
    return outputs


def test_finished_parts_are_recorded_then_replayed():
    block, targets, stream = toy()
    replay = BlockReplay(block, targets, "cpu", "cpu")
    with replay.trace(), torch.no_grad():
        block(stream[0])
    assert replay.enabled
    calls = {"a": 0, "b": 0}
    for name in calls:
        getattr(block, name).register_forward_hook(lambda *args, n=name: calls.__setitem__(n, calls[n] + 1))
    a_calls = []
    original_a = block.a.forward
    block.a.forward = lambda x: (a_calls.append(1), original_a(x))[1]  # counts real computations of a

    expected = run_pass(block, replay, stream, pruned={"a"})  # a is final: recorded
    assert len(a_calls) == 2
    with torch.no_grad():
        block.a.weight.mul_(0.0)  # a replayed pass must not see this change
    again = run_pass(block, replay, stream, pruned={"a", "b"})
    assert len(a_calls) == 2  # replayed, not recomputed
    for x, y in zip(expected, again):
        assert torch.equal(x, y)
    # nothing is final before a when a is still pending: everything is recomputed
    run_pass(block, replay, stream, pruned=set())
    assert len(a_calls) == 4


def test_replay_is_off_when_a_target_runs_twice():
    block, targets, stream = toy(twice=True)
    replay = BlockReplay(block, targets, "cpu", "cpu")
    with replay.trace(), torch.no_grad():
        block(stream[0])
    assert not replay.enabled
    with replay.reusing({"a", "b"}, len(stream)):
        assert "forward" not in block.a.__dict__ and "forward" not in block.b.__dict__


def test_replayed_outputs_are_copies():
    """Callers may modify a returned tensor in place; the recording must not change with it."""
    block, targets, stream = toy()
    replay = BlockReplay(block, targets, "cpu", "cpu")
    with replay.trace(), torch.no_grad():
        block(stream[0])
    first = run_pass(block, replay, stream, pruned={"a"})
    with replay.reusing({"a", "b"}, len(stream)), torch.no_grad():
        replay.batch = 0
        out = block.a(stream[0])
        out.add_(100.0)
        assert torch.equal(block.a(stream[0]) + 100.0, out)
    assert torch.equal(run_pass(block, replay, stream, pruned={"a", "b"})[0], first[0])


def _without_replay(monkeypatch) -> None:
    monkeypatch.setattr(BlockReplay, "reusing", lambda self, *a, **k: contextlib.nullcontext())


def _prune(arch: str, **options) -> tuple[dict[str, torch.Tensor], list[float], int]:
    """Pruned parameters, per-layer errors and how many nn.Linear forwards really ran."""
    model = make_tiny_model(arch)
    calib = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    ran = [0]
    linear_forward = nn.Linear.forward

    def counting(self, x):
        ran[0] += 1
        return linear_forward(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Linear, "forward", counting)
        report = alpsprune.prune_model(model, calib, sparsity=0.6, progress=False, **options)
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        [r.error for r in report.layers],
        ran[0],
    )


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "phi3", "gpt_neox"])
def test_pipeline_with_replay_is_bit_identical(arch, monkeypatch):
    """The sub-layer, dense-target pipeline gives exactly the same model with and without replay, and
    replay really skips linear forwards."""
    options = {"method": "alps", "dense_target": True, "allocation": "uniform", "replay_memory": None}
    weights, errors, ran = _prune(arch, **options)
    _without_replay(monkeypatch)
    weights_ref, errors_ref, ran_ref = _prune(arch, **options)
    assert errors == errors_ref
    assert all(torch.equal(weights[n], weights_ref[n]) for n in weights)
    assert ran < ran_ref


def test_replay_budget_bounds_the_cache(monkeypatch):
    """With a byte budget the recorded outputs never exceed it, some work is still skipped, and the
    model is the same as without replay."""
    peak = [0]
    drop = BlockReplay._drop_covered

    def spy(self, n_batches):
        peak[0] = max(peak[0], self.nbytes)  # records only grow during a pass: this is its peak
        drop(self, n_batches)

    monkeypatch.setattr(BlockReplay, "_drop_covered", spy)
    options = {"method": "sparsegpt", "dense_target": True, "allocation": "uniform"}
    budget = 4 * 24 * 64 * 4  # one hidden stream of the calibration set (float32): the attention output fits
    weights, errors, ran = _prune("llama", **options, replay_memory=budget)
    assert 0 < peak[0] <= budget
    weights_off, errors_off, ran_off = _prune("llama", **options, replay_memory=0)
    weights_all, _, ran_all = _prune("llama", **options, replay_memory=None)
    assert errors == errors_off
    assert all(
        torch.equal(weights[n], weights_off[n]) and torch.equal(weights[n], weights_all[n]) for n in weights
    )
    assert ran_all < ran < ran_off
