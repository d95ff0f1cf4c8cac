"""One block-streaming engine: a stream of activation batches through one decoder block at a time.

Calibration capture, the pruning loop (pruned and dense streams, replay), the allocation statistics
pass and perplexity evaluation all move data the same way, and all of it lives here:

* **where the activations live** — :class:`ActivationStream`: one hidden-states tensor per batch
  ``(b, seqlen, hidden)``, kept on the compute device, on the host (CPU memory) or on disk
  (one safetensors file per batch). Batches are fetched to the device one at a time and replaced
  *in place* by the block's outputs (:meth:`ActivationStream.put`), so a pass over a block never
  holds more than one stream plus one batch in flight;
* **how a block visits the device** — :func:`visiting`: the block is moved to the device once per
  pass over *all* batches and moved back afterwards (one visit per block per pass, not per batch);
* **the block's keyword arguments** — captured with the block-0 inputs (:func:`capture_stream`);
* **what is kept for replay** — :class:`alpsprune.models.replay.BlockReplay`, bounded by a byte
  budget (``replay_memory``; nothing by default).

Activation memory per phase is given by :func:`activation_bytes` (the memory plan models it).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AlpsPruneError, DeviceError
from .models.capture import BlockInputs, capture_block_inputs, run_block

PLACES = ("device", "host", "disk")


def resolve_place(offload_activations: bool | str) -> str:
    """``False`` → ``"device"``, ``True`` → ``"host"``; a name in :data:`PLACES` passes through."""
    if offload_activations is True:
        return "host"
    if offload_activations is False or offload_activations is None:
        return "device"
    if offload_activations in PLACES:
        return str(offload_activations)
    raise AlpsPruneError(
        f"offload_activations must be True, False or one of {PLACES}, got {offload_activations!r}"
    )


@dataclass(frozen=True)
class Placement:
    """Where the batches of a stream live (``place``) and where blocks compute (``device``)."""

    device: torch.device
    place: str = "device"
    directory: Path | None = None  # for ``place="disk"``; default: a fresh temporary folder

    @classmethod
    def make(
        cls, device: torch.device | str, offload_activations: bool | str = False, directory=None
    ) -> Placement:
        place = resolve_place(offload_activations)
        return cls(torch.device(device), place, Path(directory) if directory is not None else None)

    @property
    def store(self) -> torch.device:
        """The device the batches are kept on (disk batches are read back into CPU memory)."""
        return self.device if self.place == "device" else torch.device("cpu")


class _DiskBatch:
    """One batch in its own safetensors file; the file is removed when the last reference goes."""

    def __init__(self, tensor: torch.Tensor, directory: Path):
        from safetensors.torch import save_file

        self.path = directory / f"batch-{uuid.uuid4().hex}.safetensors"
        save_file({"h": tensor.detach().contiguous().cpu()}, str(self.path))
        self.element_size = tensor.element_size()
        self.nbytes = tensor.numel() * self.element_size
        self.shape = tuple(tensor.shape)
        weakref.finalize(self, _unlink, self.path)

    def load(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.path))["h"]


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class ActivationStream(Sequence):
    """Hidden states of every batch, on the device, the host or disk (see :class:`Placement`).

    ``stream[b]`` is batch ``b`` where it is kept (disk batches are loaded into CPU memory);
    :meth:`fetch` brings it to the compute device; :meth:`put` replaces it (the previous tensor is
    released, so a pass that puts each output back holds one stream, not two).
    """

    def __init__(self, batches: Sequence[torch.Tensor], placement: Placement):
        self.placement = placement
        self._dir: Path | None = None
        self._items: list[Any] = []
        for batch in batches:
            self.append(batch)

    # ---- storage ------------------------------------------------------------------------------
    def _directory(self) -> Path:
        if self._dir is None:
            base = self.placement.directory or os.environ.get("ALPSPRUNE_OFFLOAD_DIR")
            if base is not None:
                Path(base).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="alpsprune-activations-", dir=base))
            weakref.finalize(self, _rmdir, self._dir)
        return self._dir

    def _keep(self, tensor: torch.Tensor) -> Any:
        if self.placement.place == "disk":
            return _DiskBatch(tensor, self._directory())
        return tensor.detach().to(self.placement.store)

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(self._keep(tensor))

    def release(self, index: int) -> None:
        """Drop batch ``index`` for good (a consumer that needs it no more)."""
        self._items[index] = torch.empty(0)

    def put(self, index: int, tensor: torch.Tensor) -> None:
        """Replace batch ``index`` (typically by the block's output for it)."""
        self._items[index] = None  # release the old batch before the new one is stored
        self._items[index] = self._keep(tensor)

    # ---- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        return item.load() if isinstance(item, _DiskBatch) else item

    def fetch(self, index: int) -> torch.Tensor:
        """Batch ``index`` on the compute device."""
        return self[index].to(self.placement.device)

    def batch_shape(self, index: int) -> tuple[int, ...]:
        item = self._items[index]
        return item.shape if isinstance(item, _DiskBatch) else tuple(item.shape)

    @property
    def element_size(self) -> int:
        """Bytes per element of the batches (0 for an empty stream)."""
        if not self._items:
            return 0
        item = self._items[0]
        return item.element_size if isinstance(item, _DiskBatch) else item.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes held by the batches (wherever they live; shared batches counted in each stream)."""
        return sum(
            i.nbytes if isinstance(i, _DiskBatch) else i.numel() * i.element_size() for i in self._items
        )

    def share(self) -> ActivationStream:
        """A second stream holding the same batches (no copy until one of the two puts a new batch)."""
        other = ActivationStream([], self.placement)
        other._items = list(self._items)
        other._dir = self._dir
        return other


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def capture_stream(
    model: nn.Module, input_ids: torch.Tensor, placement: Placement, batch_size: int = 1
) -> BlockInputs:
    """Run the modules before the blocks on ``input_ids`` ``(n, seqlen)`` and keep block 0's inputs.

    Returns :class:`BlockInputs` whose ``hidden`` is an :class:`ActivationStream` at ``placement``.
    Only embeddings (and whatever runs before block 0) visit the device; each batch goes to the
    stream's place as it is produced; the keyword arguments stay on the device.
    """
    stream = ActivationStream([], placement)
    return capture_block_inputs(model, input_ids, placement.device, batch_size=batch_size, sink=stream)


# ---- blocks on the device ---------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → CUDA if available else CPU; checks that an explicit device exists."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


# attribute of a parameter that is loaded in the checkpoint's dtype (memory-mapped, shared with the page
# cache) and cast to the run's dtype only while its block visits: see :func:`defer_cast`
_CAST_ATTR = "_alpsprune_cast_to"


def defer_cast(tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Cast ``tensor`` (a parameter or buffer of a block) to ``dtype`` whenever its block visits, not now.

    A torchrun rank other than 0 loads the model in the checkpoint's dtype, where ``from_pretrained``
    memory-maps the safetensors (nothing resident until read); casting it all at load (``--dtype``)
    would make a private copy of the whole model on every rank. Deferred, the cast copy of one block
    exists only during its visit (:func:`visiting`). Casting is elementwise and deterministic, so the
    visiting block holds exactly what a cast at load would have given.
    """
    if tensor.dtype == dtype:
        if hasattr(tensor, _CAST_ATTR):
            delattr(tensor, _CAST_ATTR)
        return
    setattr(tensor, _CAST_ATTR, dtype)


def deferred_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype ``tensor`` computes in: its deferred cast's (:func:`defer_cast`), else its own."""
    return getattr(tensor, _CAST_ATTR, None) or tensor.dtype


def _home(block: nn.Module) -> torch.device:
    try:
        return next(block.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def visiting(
    block: nn.Module, device: torch.device, release: bool = False, writes: bool = True
) -> Iterator[nn.Module]:
    """The block on ``device`` for the duration (one move in, one move back: one *visit*).

    Every pass over all batches of a stream happens inside one visit; callers never move blocks
    per batch. The move calls ``block.to`` exactly twice, also when the block already lives on
    ``device`` (a no-op then), so visits can be counted on a CPU-only machine.

    ``release``: the process needs the block no more after this visit (a torchrun rank other than
    0: only rank 0 keeps the pruned model). The block works on private copies of its weights and
    ends on the ``meta`` device, so the process's memory holds one block, never the whole pruned
    model. Weights loaded from safetensors are memory-mapped (and shared between the ranks of a
    machine through the page cache) as long as nobody writes to them: the private copies keep it so.

    ``writes=False`` (the visit only reads the weights: statistics, evaluation): the block's own
    tensors are put back afterwards instead of copying the device's back, so there is no transfer
    home and memory-mapped weights stay shared (``block.to`` is then called once).

    Tensors with a deferred cast (:func:`defer_cast`) are cast on the device for the visit; with
    ``release`` or ``writes=False`` the cast copy is dropped afterwards, so a rank holds at most one
    cast block.
    """
    home = _home(block)
    tensors = [*block.parameters(), *block.buffers()]
    originals = [t.data for t in tensors] if not writes else None
    block.to(device)
    for tensor in tensors:
        cast = getattr(tensor, _CAST_ATTR, None)
        if cast is not None and tensor.dtype != cast:  # deferred cast (defer_cast): a private copy
            tensor.data = tensor.data.to(cast)
        elif release and home == device:  # on the same device .to() kept the mapped tensors: copy them
            tensor.data = tensor.data.clone()
    try:
        yield block
    finally:
        if release:
            block.to("meta")
        elif originals is not None:
            for tensor, original in zip(tensors, originals):
                tensor.data = original
        else:
            block.to(home)


def propagate(
    block: nn.Module,
    stream: ActivationStream,
    kwargs_of: Callable[[int], dict],
    *,
    before: Callable[[int], None] | None = None,
    check: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """Replace every batch of ``stream`` by the block's output for it (in place, batch by batch).

    ``before(b)`` runs before batch ``b``'s forward (e.g. to point a replay at the batch);
    ``check(b, output)`` may refuse an output (raise) before it is stored.
    """
    with torch.no_grad():
        for b in range(len(stream)):
            if before is not None:
                before(b)
            out = run_block(block, stream.fetch(b), kwargs_of(b))
            if check is not None:
                check(b, out)
            stream.put(b, out)


# ---- memory model -----------------------------------------------------------------------------------


def activation_bytes(
    nsamples: int,
    seqlen: int,
    hidden_size: int,
    dtype_bytes: int,
    *,
    dense_target: bool = False,
    batch_size: int = 1,
    replay_memory: int = 0,
    block_target_bytes: int = 0,
) -> dict[str, int]:
    """Bytes of activations the engine holds per phase (excluding weights, Grams and solver buffers).

    One stream ``S = nsamples × seqlen × hidden_size × dtype_bytes``; one batch in flight
    ``B = batch_size × seqlen × hidden_size × dtype_bytes`` (its input and output; the block's own
    temporaries for one batch are the model's forward cost, not counted here).

    * ``capture``: ``S + B`` (block-0 inputs, one batch being embedded);
    * ``prune`` (statistics, solve, propagate of one block): ``S + B`` for the pruned stream, plus
      ``S + B`` for the dense stream with ``dense_target``, plus at most ``replay_memory`` for the
      caches (the replay cache, and, when the budget has room for them, the dense block's layer
      inputs over all batches: ``Σ_groups in_features × nsamples × seqlen × dtype_bytes``, e.g.
      ``(3·hidden + intermediate)/hidden`` streams for LLaMA), plus, with ``dense_target`` and the
      dense inputs recomputed, a copy of the block's dense target weights (``block_target_bytes``,
      on the compute device; a bound: the last stage's layers are not copied);
    * ``allocate``: ``S + B`` (one dense stream);
    * ``evaluate``: ``S + B`` with the windows in place of the calibration samples.

    Where the bytes live follows the placement: all on the device for ``"device"``; for ``"host"``
    and ``"disk"`` the streams and the replay cache are on the host (disk) and only the batches in
    flight (``B`` per stream) and the dense weight copy are on the device.
    """
    S = nsamples * seqlen * hidden_size * dtype_bytes
    B = batch_size * seqlen * hidden_size * dtype_bytes
    streams = 2 if dense_target else 1
    return {
        "capture": S + B,
        "prune": streams * (S + B) + replay_memory + (block_target_bytes if dense_target else 0),
        "allocate": S + B,
        "evaluate": S + B,
    }


def fits_on_device(model: nn.Module, device: torch.device, reserve: int = 0) -> bool:
    """Whether all of ``model``'s weights (plus ``reserve`` bytes) fit in ``device``'s free memory.

    The CPU always "fits" (weights loaded on the host are there already)."""
    if device.type != "cuda":
        return True
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device != device)
    free, _ = torch.cuda.mem_get_info(device)
    return weights + reserve <= 0.9 * free


# ---- whole-model forward, block by block ------------------------------------------------------------


def stream_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    placement: Placement,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """The model's outputs for ``input_ids`` ``(n, L)``, computed block by block over all batches.

    Yields ``(ids, output)`` per batch of ``batch_size`` rows, ``output`` being what the model's own
    forward returns (``.logits``). Each decoder block visits ``placement.device`` once for all
    batches (:func:`visiting`), the hidden states wait at ``placement.place`` between blocks; the
    embeddings and the head run on the device. The head runs inside the model's own forward, with
    every block's forward replaced by one that hands back its stored result, so final norms, output
    projections and logit soft-capping are the model's own. ``progress(k)`` is called with the
    number of blocks finished.
    """
    from .models.capture import _as_kwargs, _move_outside_blocks, replaced_forwards
    from .models.discovery import find_decoder_blocks

    device = placement.device
    path, blocks = find_decoder_blocks(model)
    inputs = capture_stream(model, input_ids, placement, batch_size)
    stream: ActivationStream = inputs.hidden
    like: list[Any] = []  # the last block's raw output for one batch: the structure to hand back

    def keep_structure(module: nn.Module, args: Any, output: Any) -> None:
        if not like:
            like.append(output)

    with torch.no_grad():
        for index, block in enumerate(blocks):
            handle = block.register_forward_hook(keep_structure) if index == len(blocks) - 1 else None
            try:
                with visiting(block, device, writes=False):
                    propagate(block, stream, lambda b, i=index: inputs.kwargs_for(i, b))
            finally:
                if handle is not None:
                    handle.remove()
            if progress is not None:
                progress(index + 1)

    def wrap(hidden: torch.Tensor) -> Any:
        out = like[0] if like else hidden
        if isinstance(out, tuple):
            return (hidden, *out[1:])
        return hidden

    signature = inspect.signature(blocks[0].forward)
    final: list[torch.Tensor] = []

    def passthrough(*args: Any, **kwargs: Any) -> Any:  # blocks before the last: skip the work
        return wrap(_as_kwargs(signature, args, kwargs)[0])

    def last(*args: Any, **kwargs: Any) -> Any:
        return wrap(final[0])

    forwards = {block: passthrough for block in blocks[:-1]}
    forwards[blocks[-1]] = last
    restore = _move_outside_blocks(model, path, device)
    try:
        with torch.no_grad(), replaced_forwards(forwards):
            for b, start in enumerate(range(0, input_ids.shape[0], batch_size)):
                ids = input_ids[start : start + batch_size].to(device)
                final[:] = [stream.fetch(b)]
                yield ids, model(input_ids=ids, use_cache=False)
                stream.release(b)
    finally:
        restore()
