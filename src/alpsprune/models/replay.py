"""Skipping the finished parts of a block in later passes over the same activations.

With sub-layer statistics the pipeline runs a block several times over the same (pruned-stream)
inputs: once per stage to collect the next group's statistics, and once more to produce the next
block's inputs. Parts of the block that run *before* every still-unpruned target linear compute the
very same output in each of those passes, so their outputs are recorded once and replayed after.

Which parts are safe is read from one traced forward (the order in which submodules start and end),
not from the architecture: a submodule may be replayed in a pass if it was called exactly once in the
trace, contains a target linear (parts without one are cheap: norms, activations) and ends before the
first target linear that is still unpruned starts. Everything it depends on then ran earlier with its
final weights, so its output cannot change any more. Blocks whose target linears are not called
exactly once (mixtures of experts route differently per batch) are left alone.

Recorded outputs are copies kept on the activation store device (clones: callers may modify
returned tensors in place). Memory: at most ``budget`` bytes (``None``: no limit). Unbounded, the
cache holds the outputs of the replayable parts of one block over all batches, e.g. the attention
output plus the MLP's gate and up projections for a LLaMA block (≈ 6× the hidden stream for
LLaMA-2-7B); a part is recorded only if its outputs over all batches (estimated from the traced
forward) fit in what the budget leaves, otherwise smaller parts inside it are considered.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from alpsprune.models.capture import replaced_forwards


class _Uncacheable(Exception):
    """A module returned something other than tensors, ``None`` and plain scalars."""


def _copy(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v, device) for v in value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise _Uncacheable


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class BlockReplay:
    """Records and replays outputs of finished submodules of one block over one activation stream.

    Usage per block: run one forward inside :meth:`trace`; then wrap every later pass over the same
    stream in :meth:`reusing` with the names of the target linears already pruned, and set
    :attr:`batch` before each batch's forward. Forwards of *another* stream through the same block
    (the dense stream) run inside :meth:`paused`. ``budget``: bytes the recorded outputs may take
    (``None``: no limit; ``0``: replay off).
    """

    def __init__(
        self,
        block: nn.Module,
        targets: dict[str, nn.Module],
        device: torch.device | str,
        store: torch.device | str,
        budget: int | None = None,
    ):
        self.block = block
        self.targets = targets
        self.device = torch.device(device)
        self.store = torch.device(store)
        self.budget = budget
        self.batch = 0
        self.paused_ = False
        self._sizes: dict[nn.Module, int] = {}  # output bytes of one traced batch
        self._spans: dict[nn.Module, tuple[int, int, int]] = {}  # first start, last end, calls
        self._cache: dict[nn.Module, dict[int, Any]] = {}
        self._refused: set[nn.Module] = set()
        self._parent: dict[nn.Module, nn.Module] = {
            child: module for module in block.modules() for child in module.children()
        }
        target_set = set(targets.values())
        self._heavy = {
            m for m in block.modules() if m is not block and any(t in target_set for t in m.modules())
        }
        self.enabled = False

    @contextlib.contextmanager
    def trace(self) -> Iterator[None]:
        """Record when each submodule starts and ends during the forward run inside the context."""
        clock = [0]
        spans: dict[nn.Module, list[int]] = {}

        def before(module: nn.Module, args: Any) -> None:
            clock[0] += 1
            span = spans.setdefault(module, [clock[0], clock[0], 0])
            span[2] += 1

        def after(module: nn.Module, args: Any, output: Any) -> None:
            clock[0] += 1
            spans[module][1] = clock[0]
            self._sizes[module] = _nbytes(output)

        handles = []
        for module in self.block.modules():
            if module is not self.block:
                handles.append(module.register_forward_pre_hook(before))
                handles.append(module.register_forward_hook(after))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._spans = {m: (s[0], s[1], s[2]) for m, s in spans.items()}
        self.enabled = self.budget != 0 and all(
            self._spans.get(m, (0, 0, 0))[2] == 1 for m in self.targets.values()
        )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the context every submodule computes (no replay, no recording): for other streams."""
        self.paused_ = True
        try:
            yield
        finally:
            self.paused_ = False

    @property
    def nbytes(self) -> int:
        """Bytes the recorded outputs hold now."""
        return sum(_nbytes(v) for cache in self._cache.values() for v in cache.values())

    def _replayable(self, pruned: set[str]) -> set[nn.Module]:
        pending = [self._spans[m][0] for name, m in self.targets.items() if name not in pruned]
        first_pending = min(pending, default=math.inf)
        return {
            m
            for m in self._heavy
            if m in self._spans
            and self._spans[m][2] == 1
            and self._spans[m][1] < first_pending
            and m not in self._refused
        }

    def _complete(self, module: nn.Module, n_batches: int) -> bool:
        return len(self._cache.get(module, ())) == n_batches

    @contextlib.contextmanager
    def reusing(self, pruned: set[str], n_batches: int, record: bool = True) -> Iterator[None]:
        """Within the context, finished parts replay their recorded outputs; with ``record`` the largest
        finished parts not yet recorded are recorded (skip it for the last pass over a block)."""
        if not self.enabled:
            yield
            return
        ready = self._replayable(pruned)
        replays: list[nn.Module] = []
        records: list[nn.Module] = []
        # room left for new records; replayed parts keep their bytes, deeper records they cover are
        # dropped after this pass (so a recorded outer part may count them twice for one pass: safe)
        room = [math.inf if self.budget is None else self.budget - self.nbytes]

        def visit(module: nn.Module, may_record: bool) -> None:
            for child in module.children():
                if child in ready and self._complete(child, n_batches):
                    replays.append(child)  # its whole subtree is skipped
                    continue
                cost = self._sizes.get(child, 0) * n_batches
                if child in ready and may_record and cost <= room[0]:
                    records.append(child)
                    room[0] -= cost
                    visit(child, False)  # inside a recorded part: replay deeper parts, record nothing
                    continue
                visit(child, may_record)

        visit(self.block, record)
        forwards = {module: self._replayer(module, module.forward) for module in replays}
        for module in records:
            self._cache.setdefault(module, {})
            forwards[module] = self._recorder(module, module.forward)
        try:
            with replaced_forwards(forwards):
                yield
        finally:
            self._drop_covered(n_batches)

    def _replayer(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        cache = self._cache[module]

        def replay(*args: Any, **kwargs: Any) -> Any:
            hit = None if self.paused_ else cache.get(self.batch)
            return forward(*args, **kwargs) if hit is None else _copy(hit, self.device)

        return replay

    def _recorder(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        cache = self._cache[module]

        def record(*args: Any, **kwargs: Any) -> Any:
            output = forward(*args, **kwargs)
            if module not in self._refused and not self.paused_:
                try:
                    cache[self.batch] = _copy(output, self.store)
                except _Uncacheable:
                    self._refused.add(module)
                    cache.clear()
            return output

        return record

    def _drop_covered(self, n_batches: int) -> None:
        """Forget incomplete records and those inside a complete one (the outer one replays them all)."""
        for module in list(self._cache):
            if not self._complete(module, n_batches):
                del self._cache[module]
        for module in list(self._cache):
            parent = self._parent.get(module)
            while parent is not None:
                if parent in self._cache:
                    del self._cache[module]
                    break
                parent = self._parent.get(parent)

    def clear(self) -> None:
        self._cache.clear()
