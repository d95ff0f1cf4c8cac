"""Running the pipeline on several processes with ``torch.distributed`` (``torchrun``).

Two kinds of parallelism, both on PyTorch's own runtime:

* **data parallel calibration** — each rank pushes its contiguous share of the calibration
  windows through the current block; the Grams are summed with an all-reduce (float64);
* **task parallel solves** — the layer problems of a block are assigned to ranks by estimated
  cost (greedy longest-processing-time bin packing), each rank solves its share, and the pruned
  weights are broadcast from their owner so every rank continues with the same pruned block.

A single process uses :func:`single_process`, whose methods are no-ops; nothing here needs a
distributed setup unless ``WORLD_SIZE > 1``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .stats import Gram


def layer_cost(out_features: int, in_features: int, iterations: int = 50) -> float:
    """Rough flop count of one ALPS solve: one ``in³`` eigendecomposition plus ``~4·in²·out`` per
    ADMM iteration (SPEC §2); used only to balance ranks."""
    return 9.0 * in_features**3 + 4.0 * iterations * in_features**2 * out_features


def assign_tasks(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy LPT: largest task first, each to the currently least-loaded rank. Returns owner per task."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


class Parallel:
    """Single-process behaviour; :class:`Distributed` overrides the collective parts."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, calibration: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the calibration windows."""
        return calibration

    def shard_list(self, items: list) -> list:
        return items

    def gather_list(self, items: list) -> list:
        """All ranks' shares, concatenated in rank order (valid on rank 0)."""
        return items

    def all_reduce_grams(self, grams: dict[str, Gram]) -> None:
        """Sum the Grams over ranks (in place)."""

    def solve(
        self,
        tasks: list[tuple[str, str]],
        fn: Callable[[str, str], tuple],
        like: Callable[[str], torch.Tensor] | None = None,
    ) -> dict[str, tuple]:
        """Run ``fn(name, leader) -> (weight, record)`` for every task; every rank gets every result.

        ``like(name)`` gives a tensor with the result weight's shape and dtype (for receiving it).
        """
        return {name: fn(name, leader) for name, leader in tasks}

    def barrier(self) -> None:
        """Wait for all ranks."""


def single_process() -> Parallel:
    return Parallel()


class Distributed(Parallel):
    """``torch.distributed`` implementation; the process group must already be initialised."""

    def __init__(self, costs: Callable[[str], float] | None = None):
        """:param costs: estimated cost of a task by layer name (default: from the layer shape)."""
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()
        # gloo collectives need CPU tensors, nccl needs CUDA ones
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )
        self.costs = costs

    def _bounds(self, n: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, calibration: torch.Tensor) -> torch.Tensor:
        if calibration.shape[0] < self.world_size:
            raise ValueError(
                f"{calibration.shape[0]} calibration windows cannot be split over {self.world_size} processes"
            )
        start, stop = self._bounds(calibration.shape[0])
        return calibration[start:stop]

    def shard_list(self, items: list) -> list:
        start, stop = self._bounds(len(items))
        return items[start:stop]

    def gather_list(self, items: list) -> list:
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, [t.cpu() if torch.is_tensor(t) else t for t in items])
        return [x for part in parts for x in part]

    def all_reduce_grams(self, grams: dict[str, Gram]) -> None:
        for name in sorted(grams):  # same order on every rank
            gram = grams[name]
            for attr in ("G", "sum", "cross"):
                tensor = getattr(gram, attr)
                if tensor is None:
                    continue
                buf = tensor.to(self.comm_device)
                dist.all_reduce(buf)
                setattr(gram, attr, buf.to(tensor.device))
            count = torch.tensor([gram.count], dtype=torch.float64, device=self.comm_device)
            dist.all_reduce(count)
            gram.count = int(count.item())
            gram.free()

    def solve(
        self,
        tasks: list[tuple[str, str]],
        fn: Callable[[str, str], tuple],
        like: Callable[[str], torch.Tensor] | None = None,
    ) -> dict[str, tuple]:
        costs = [self.costs(name) if self.costs else layer_cost(*like(name).shape) for name, _ in tasks]
        owners = assign_tasks(costs, self.world_size)
        mine = {name: fn(name, leader) for (name, leader), owner in zip(tasks, owners) if owner == self.rank}
        results: dict[str, tuple] = {}
        for (name, _), owner in zip(tasks, owners):
            payload = [mine[name][1] if owner == self.rank else None]
            dist.broadcast_object_list(payload, src=owner)  # the LayerRecord (small)
            record = payload[0]
            if owner == self.rank:
                weight = mine[name][0]
                buf = weight.to(self.comm_device)
            else:
                template = like(name)
                buf = torch.empty(template.shape, dtype=template.dtype, device=self.comm_device)
            dist.broadcast(buf, src=owner)
            results[name] = (buf, record)
        return results

    def barrier(self) -> None:
        dist.barrier()


def init_from_env() -> Parallel:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE > 1``), else run single-process.

    Backend: ``nccl`` when CUDA is available, otherwise ``gloo``; each rank uses ``cuda:LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return single_process()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Distributed()


def default_device(parallel: Parallel) -> str:
    """Per-rank compute device: ``cuda:LOCAL_RANK`` under torchrun with GPUs, else CPU/auto."""
    if parallel.world_size > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "auto"
