"""Running the pipeline on several processes with ``torch.distributed`` (``torchrun``).

Two kinds of parallelism, both on PyTorch's own runtime:

* **data parallel calibration** — each rank pushes its contiguous share of the calibration
  windows through the current block; the Grams are summed with an all-reduce (float64);
* **task parallel solves** — the layer problems of a block are assigned to ranks by estimated
  cost (greedy longest-processing-time bin packing), each rank solves its share, and the pruned
  weights are broadcast from their owner so every rank continues with the same pruned block.

A single process uses :func:`single_process`, whose methods are no-ops; nothing here needs a
distributed setup unless ``WORLD_SIZE > 1``. See ``docs/distributed.md``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .errors import AlpsPruneError, DataError, SolverError
from .stats import Gram

# Collectives wait this long for the slowest rank (rank 0 evaluates the dense model alone, and one
# large layer solve can take many minutes on 70B models; torch's defaults are 10 / 30 minutes).
DEFAULT_TIMEOUT_MIN = 180


def layer_cost(out_features: int, in_features: int, iterations: int = 50) -> float:
    """Rough flop count of one ALPS solve: one ``in³`` eigendecomposition plus ``~4·in²·out`` per
    ADMM iteration (SPEC §2); used only to balance ranks."""
    return 9.0 * in_features**3 + 4.0 * iterations * in_features**2 * out_features


def assign_tasks(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy LPT: largest task first (ties: lower index), each to the least-loaded rank (ties: lower
    rank). Deterministic, so every rank computes the same owners. Returns the owner of each task."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
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

    def shard(self, calibration: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """This rank's contiguous share of the calibration windows, in whole batches of ``batch_size``."""
        return calibration

    def shard_list(self, items: list) -> list:
        return items

    def gather_list(self, items: list) -> list:
        """All ranks' shares, concatenated in rank order on rank 0 (other ranks get ``[]``)."""
        return items

    def all_reduce_grams(self, grams: dict[str, Gram]) -> None:
        """Sum the Grams over ranks (in place)."""

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``(n_r, ...)`` rows concatenated in rank order, on every rank (ranks may hold
        different ``n_r``, also 0). Used where a sum must follow the single process's batch order."""
        return rows

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over ranks, in place (every rank gets the sums)."""

    def solve(
        self,
        tasks: list[tuple[str, str]],
        fn: Callable[[str, str], tuple],
        like: Callable[[str], torch.Tensor] | None = None,
    ) -> dict[str, tuple]:
        """Run ``fn(name, leader) -> (weight, record)`` for every task; every rank gets every result.

        ``like(name)`` gives a tensor shaped like the layer's ``(out, in)`` weight (used for costs).
        """
        return {name: fn(name, leader) for name, leader in tasks}

    def align_model(self, model: torch.nn.Module) -> None:
        """Make this rank's model compute exactly as rank 0's (see :meth:`Distributed.align_model`)."""

    def barrier(self) -> None:
        """Wait for all ranks."""


def single_process() -> Parallel:
    return Parallel()


class Distributed(Parallel):
    """``torch.distributed`` implementation; the process group must already be initialised.

    Tensor collectives run where the backend can take them: CUDA tensors on ``nccl``, CPU tensors
    on ``gloo`` (``init_from_env`` sets up ``cpu:gloo,cuda:nccl`` on GPU machines, so both work);
    object collectives (layer records, checkpoint gathers) go over the CPU backend when there is one.
    """

    def __init__(self, costs: Callable[[str], float] | None = None):
        """:param costs: estimated cost of a task by layer name (default: from the layer shape)."""
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = str(dist.get_backend())
        self.costs = costs

    def _comm_device(self, device: torch.device) -> torch.device:
        """Where a tensor living on ``device`` must be for a collective on this backend."""
        has_gloo, has_nccl = "gloo" in self.backend, "nccl" in self.backend
        if device.type == "cuda" and has_nccl:
            return device
        if has_gloo or not has_nccl:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())  # nccl only: CPU data goes via the GPU

    def _bounds(self, n: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, calibration: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
        """Contiguous shares of whole batches, as the single process would form them: batch ``b`` holds
        windows ``b·bs … b·bs+bs−1``, and the batch counts of the ranks differ by at most one (the first
        ``n_batches % world`` ranks get one more). Each batch's ``XᵀX`` is then the very product the
        single process computes, and their float64 sum agrees with the single process's (sums of float32
        products are exact in float64 unless magnitudes span more than ~2²⁹): the same Grams, bit for bit."""
        n = calibration.shape[0]
        n_batches = -(-n // max(batch_size, 1))
        if n_batches < self.world_size:
            raise DataError(
                f"{n} calibration windows in batches of {batch_size} make {n_batches} batches, too few for "
                f"{self.world_size} processes; use --nsamples {self.world_size * batch_size} or more, "
                "a smaller --batch-size, or fewer processes"
            )
        start, stop = self._bounds(n_batches)
        return calibration[start * batch_size : min(stop * batch_size, n)]

    def shard_list(self, items: list) -> list:
        start, stop = self._bounds(len(items))
        return items[start:stop]

    def gather_list(self, items: list) -> list:
        payload = [t.cpu() if torch.is_tensor(t) else t for t in items]
        parts: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(payload, parts, dst=0)
        return [x for part in parts for x in part] if self.is_main else []

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        comm = self._comm_device(rows.device)
        counts = torch.tensor([rows.shape[0]], dtype=torch.int64, device=comm)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(all_counts, counts)
        sizes = [int(c) for c in all_counts]
        padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=comm)
        padded[: rows.shape[0]] = rows.to(comm)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(rows.device)

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        # one flat buffer per dtype: one collective per step, not one per parameter
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            buf = flat.to(self._comm_device(flat.device))
            dist.all_reduce(buf)
            buf = buf.to(flat.device)
            offset = 0
            for t in group:
                t.copy_(buf[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_grams(self, grams: dict[str, Gram]) -> None:
        names = sorted(grams)  # same order on every rank
        if not names:
            return
        # counts and "has a cross term" flags of every Gram in one collective (int64: exact)
        meta = torch.tensor(
            [[grams[n].count, int(grams[n].cross is not None), grams[n].samples] for n in names],
            dtype=torch.int64,
        )
        meta_buf = meta.to(self._comm_device(meta.device))
        dist.all_reduce(meta_buf)
        meta = meta_buf.cpu()
        for i, name in enumerate(names):
            gram = grams[name]
            if gram.cross is None and int(meta[i, 1]) > 0:  # another rank has one: add zeros here
                gram.cross = torch.zeros_like(gram.G)
            for attr in ("G", "sum", "sample_sq", "cross"):
                tensor = getattr(gram, attr)
                if tensor is None:
                    continue
                buf = tensor.to(self._comm_device(tensor.device))
                dist.all_reduce(buf)  # float64 sums, as accumulated
                setattr(gram, attr, buf.to(tensor.device))
            gram.count, gram.samples = int(meta[i, 0]), int(meta[i, 2])
            gram.free()

    def solve(
        self,
        tasks: list[tuple[str, str]],
        fn: Callable[[str, str], tuple],
        like: Callable[[str], torch.Tensor] | None = None,
    ) -> dict[str, tuple]:
        if self.costs is not None:
            costs = [float(self.costs(name)) for name, _ in tasks]
        elif like is not None:
            costs = [layer_cost(*tuple(like(name).shape)[:2]) for name, _ in tasks]
        else:
            costs = [1.0] * len(tasks)
        owners = assign_tasks(costs, self.world_size)
        mine: dict[str, tuple | BaseException] = {}
        for (name, leader), owner in zip(tasks, owners):
            if owner != self.rank:
                continue
            try:
                mine[name] = fn(name, leader)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below, so none hangs
                mine[name] = exc
        results: dict[str, tuple] = {}
        for (name, _), owner in zip(tasks, owners):
            # 1. small metadata from the owner: the LayerRecord and the weight's shape/dtype, or the error
            if owner == self.rank:
                own = mine[name]
                if isinstance(own, BaseException):
                    meta = ("error", type(own).__name__, str(own), isinstance(own, AlpsPruneError))
                else:
                    weight, record = own
                    dtype_name = str(weight.dtype).removeprefix("torch.")
                    comm = self._comm_device(weight.device).type
                    meta = ("ok", record, tuple(weight.shape), dtype_name, comm)
            else:
                meta = None
            payload = [meta]
            dist.broadcast_object_list(payload, src=owner)
            meta = payload[0]
            if meta[0] == "error":  # every rank stops at the same task
                if owner == self.rank:
                    raise mine[name]
                kind = AlpsPruneError if meta[3] else SolverError
                raise kind(f"{meta[2]} (on rank {owner})")
            _, record, shape, dtype, comm = meta
            dtype = getattr(torch, dtype)
            # 2. the weight as raw bytes: any dtype (bf16/fp16 too) on any backend, bit-exact
            if owner == self.rank:
                weight = mine[name][0].detach().contiguous()
                buf = weight.reshape(-1).view(torch.uint8).to(self._comm_device(weight.device))
            else:
                nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                device = torch.device("cuda", torch.cuda.current_device()) if comm == "cuda" else "cpu"
                buf = torch.empty(nbytes, dtype=torch.uint8, device=device)  # where the owner sends from
            dist.broadcast(buf, src=owner)
            results[name] = (buf.view(dtype).reshape(shape), record)
        return results

    def align_model(self, model: torch.nn.Module) -> None:
        """Rank 0 (which loaded the run's ``--dtype``) tells every other rank the dtype of each of its
        parameters and sends its buffers; the other ranks loaded the checkpoint's own dtype, which
        ``from_pretrained`` memory-maps (nothing resident until read, shared between the ranks of a
        machine through the page cache). They cast the parameters outside the decoder blocks now
        (embeddings, final norm, LM head: needed for capture) and defer each block's casts to its visits
        (:func:`alpsprune.streaming.defer_cast`), so a rank holds one cast block, not a cast copy of the
        model. Buffers (rotary frequencies and the like: small, some computed at construction in the
        load dtype) are taken from rank 0 as they are. Afterwards every tensor a block computes with is
        bit for bit rank 0's; so is the config's ``dtype`` (``from_pretrained`` records the load dtype
        there), and :func:`alpsprune.checkpoint.model_identity` sees the deferred dtypes.
        """
        from .models import find_decoder_blocks
        from .streaming import defer_cast

        if self.is_main:
            payload = [
                {
                    "params": {n: str(t.dtype) for n, t in model.named_parameters(remove_duplicate=False)},
                    "buffers": {n: b.detach().cpu() for n, b in model.named_buffers(remove_duplicate=False)},
                    "config_dtype": getattr(getattr(model, "config", None), "dtype", None),
                }
            ]
        else:
            payload = [None]
        dist.broadcast_object_list(payload, src=0)
        if self.is_main:
            return
        dtypes = {n: getattr(torch, d.removeprefix("torch.")) for n, d in payload[0]["params"].items()}
        buffers = payload[0]["buffers"]
        mine = dict(model.named_parameters(remove_duplicate=False))
        if mine.keys() != dtypes.keys() or {n for n, _ in model.named_buffers(remove_duplicate=False)} != set(
            buffers
        ):
            raise AlpsPruneError(
                "rank 0 loaded a model with other tensors than this rank's; same --model on every rank?"
            )
        if payload[0]["config_dtype"] is not None:  # from_pretrained records the dtype it loaded in
            model.config.dtype = payload[0]["config_dtype"]
        _, blocks = find_decoder_blocks(model)
        in_blocks = {id(t) for block in blocks for t in block.parameters()}
        for name, param in mine.items():
            if id(param) in in_blocks:
                defer_cast(param, dtypes[name])
            elif param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
        for name, _ in model.named_buffers(remove_duplicate=False):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            home = owner._buffers[attr].device
            owner._buffers[attr] = buffers[name].to(home)

    def barrier(self) -> None:
        dist.barrier()


def init_from_env(device: str = "auto") -> Parallel:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE > 1``), else run single-process.

    Backend: ``gloo`` on CPU-only machines (or with ``device="cpu"``), ``cpu:gloo,cuda:nccl`` when CUDA
    is available (GPU tensors over NCCL, CPU objects over gloo); override with ``$ALPSPRUNE_DIST_BACKEND``.
    Each rank uses ``cuda:LOCAL_RANK``. Collective timeout: ``$ALPSPRUNE_DIST_TIMEOUT_MIN`` minutes
    (default 180).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return single_process()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if use_cuda:
            torch.cuda.set_device(_local_gpu())
        backend = os.environ.get("ALPSPRUNE_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
        minutes = float(os.environ.get("ALPSPRUNE_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    parallel = Distributed()
    if not parallel.is_main:
        _quiet_progress()
    return parallel


def _quiet_progress() -> None:
    """Progress bars on rank 0 only: silence the Hugging Face libraries' bars on the other ranks."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _local_gpu() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)


def default_device(parallel: Parallel, requested: str = "auto") -> str:
    """Per-rank compute device: under torchrun with GPUs, ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``."""
    if parallel.world_size > 1 and torch.cuda.is_available() and str(requested) in ("auto", "cuda"):
        return f"cuda:{_local_gpu()}"
    return requested


def finalize(parallel: Parallel) -> None:
    """Leave the process group (no-op single-process)."""
    if parallel.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
