"""Per-block checkpoints so a killed run resumes where it stopped.

After block ``i`` the folder holds (each file written to a temporary name, then renamed):

* ``block_0000.safetensors`` … ``block_i.safetensors`` — the pruned target weights of each block
  (written by rank 0; every rank holds the same pruned weights);
* ``inputs_i_rank{r}.safetensors`` — the next block's calibration inputs of rank ``r``'s windows
  (tensor ``hidden``, and ``dense`` for the dense stream), one window per row: every rank writes its
  own shard, nothing is gathered or pickled;
* ``state.json`` — the commit point: fingerprint, next block, the input shards and how many windows
  each holds, the report so far;
* ``dense_eval.json`` — the CLI's dense perplexities, with the settings they were measured with;
* ``alpsprune_checkpoint.json`` — the ledger: the name of every file the checkpointer wrote.

``state.json`` is replaced last, so a crash at any moment leaves either the previous or the new
consistent state; the previous block's input shards are removed only after that. Clean-up removes the
files the ledger names (and only those), then the folder if it is then empty: whatever else a user
keeps in the folder survives.

Resuming re-batches and re-shards: the saved inputs are per window, so a resume with another
``--batch-size`` or another number of processes reads exactly its windows and forms its own batches.

Disk cost: the pruned weights of the targeted layers (about the model's size in its dtype, since
every block is kept) plus one copy of the calibration activations:
``nsamples × seqlen × hidden × 4`` bytes in float32 (128 × 2048 × 4096 × 4 B = 4.3 GB for a
7B model; twice that with the dense-output target).

Determinism: the same model, calibration tokens (same source, ``nsamples``, ``seqlen`` and seed),
method, options and library versions give the same pruned weights, bit for bit, on CPU — and a run
killed and resumed from a checkpoint (same batch size) gives exactly the weights of an uninterrupted
one, since the saved block inputs are the exact tensors the next block would have seen. Solvers break
ties by index, never by chance. The fingerprint covers the settings, the calibration tokens and the
model (config and a sample of every weight tensor), so a checkpoint is never continued with another
model. On GPU, cuBLAS reductions and ``torch.linalg.eigh``/Cholesky may differ in the last bits
between runs, GPU models or driver versions, and a support decision on a near-tie can then flip;
results agree to rounding, not bit for bit. Resuming on another device, batch size or world size than
the one that wrote the checkpoint is allowed (none of them is part of the fingerprint) but is only as
reproducible as that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError, OutputError
from .report import PruneReport

STATE = "state.json"
LEDGER = "alpsprune_checkpoint.json"
DENSE_EVAL = "dense_eval.json"
_LEDGER_MARK = "alpsprune checkpoint"
_UNFINGERPRINTED = ("device", "world_size", "batch_size")  # may change between the run and the resume
_SAMPLED = 4096  # weight entries hashed per tensor for the model's identity


# ---- identity ---------------------------------------------------------------------------------------


def model_identity(model: nn.Module | None) -> str:
    """A cheap digest of a model: its config and, per tensor, name, shape, dtype and ~4096 evenly spaced
    entries. Two different checkpoints (even fine-tunes of one base) differ in it; reading it costs
    milliseconds per tensor, not a pass over all weights."""
    if model is None:
        return ""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # private keys and names/versions/alpsprune's own settings do not change what the model computes
        skip = {"_name_or_path", "transformers_version", "alpsprune", "architectures"}
        items = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in skip}
        h.update(json.dumps(items, sort_keys=True, default=str).encode())
    from .streaming import deferred_dtype

    with torch.no_grad():
        # keep_vars: the parameters themselves, which carry a deferred cast (torchrun ranks other than 0
        # load the checkpoint's dtype and cast a block when it visits): the digest is of the cast model
        for name, tensor in model.state_dict(keep_vars=True).items():
            dtype = deferred_dtype(tensor)
            h.update(f"{name}:{tuple(tensor.shape)}:{dtype}".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            # casting is elementwise: the sample of the cast tensor is the cast of the sample
            sample = flat[:: max(1, flat.numel() // _SAMPLED)].contiguous().cpu().to(dtype)
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(settings: dict, calibration: torch.Tensor, model: nn.Module | None = None) -> str:
    """Hash of what determines the result: settings (minus placement), the calibration tokens, the model."""
    stable = {k: v for k, v in settings.items() if k not in _UNFINGERPRINTED}
    h = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    h.update(calibration.cpu().contiguous().numpy().tobytes())
    h.update(model_identity(model).encode())
    return h.hexdigest()


# ---- the folder: what alpsprune wrote there, by name ------------------------------------------------


def is_checkpoint_folder(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds an alpsprune checkpoint ledger."""
    return CheckpointFolder(path).ledger() is not None


def check_checkpoint_folder(path: str | os.PathLike[str], flag: str = "--checkpoint-dir") -> None:
    """Refuse a checkpoint folder that holds files but no alpsprune ledger, and unsafe folders.

    :raises OutputError: naming the folder and the way out.
    """
    from .io import refuse_unsafe_folder

    folder = Path(path)
    refuse_unsafe_folder(folder, flag)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder} exists and is not a folder; choose another {flag}")
    if folder.is_dir() and any(folder.iterdir()) and not is_checkpoint_folder(folder):
        shown = ", ".join(sorted(p.name for p in folder.iterdir())[:3])
        raise OutputError(
            f"{flag} {folder} is not empty and is not an alpsprune checkpoint (it holds {shown}); alpsprune "
            f"never writes over files it did not create: choose another {flag}"
        )


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``<name>.tmp``, flush to disk, give the ordinary file mode, rename into place."""
    from .io import file_mode

    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, file_mode())  # safetensors creates files 0600
    os.replace(tmp, path)


class CheckpointFolder:
    """The files the checkpointer wrote in one folder, recorded by name in its ledger before each is
    written; only those are ever replaced or removed."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)

    def ledger(self) -> list[str] | None:
        try:
            data = json.loads((self.dir / LEDGER).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("written_by") != _LEDGER_MARK:
            return None
        return [
            n for n in data.get("files", []) if isinstance(n, str) and "/" not in n and n not in ("", "..")
        ]

    def _set_ledger(self, names: Iterable[str]) -> None:
        files = sorted(set(names))
        data = {"written_by": _LEDGER_MARK, "files": files}
        _atomic(self.dir / LEDGER, lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))

    def register(self, names: Iterable[str]) -> None:
        """Record ``names`` as alpsprune's before they are written (a crash leaves no unrecorded file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        known = self.ledger() or []
        names = [n for n in names if n not in known]
        if names or not (self.dir / LEDGER).exists():
            self._set_ledger([*known, *names])

    def write(self, name: str, write: Callable[[Path], None]) -> None:
        self.register([name])
        _atomic(self.dir / name, write)

    def remove(self, names: Iterable[str]) -> None:
        """Delete files the ledger names (and their temporary ``.tmp`` twins), then drop them from it."""
        known = self.ledger() or []
        names = [n for n in names if n in known]
        for name in names:
            (self.dir / name).unlink(missing_ok=True)
            (self.dir / (name + ".tmp")).unlink(missing_ok=True)
        if names:
            self._set_ledger([n for n in known if n not in names])

    def clean(self) -> None:
        """Remove every file the checkpointer wrote, the ledger last, then the folder only if it is empty."""
        known = self.ledger()
        if known is None:
            return
        self.remove(known)
        (self.dir / LEDGER).unlink(missing_ok=True)
        (self.dir / (LEDGER + ".tmp")).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # fails, as it should, when anything else is in it


def has_unfinished_run(directory: str | os.PathLike[str]) -> bool:
    """A committed ``state.json`` that the ledger says alpsprune wrote."""
    names = CheckpointFolder(directory).ledger()
    return names is not None and STATE in names and (Path(directory) / STATE).is_file()


# ---- dense evaluation, reused on resume only for the same model and evaluation settings ----------------


def save_dense_eval(directory: str | os.PathLike[str], key: dict, results: dict) -> None:
    payload = {"key": key, "results": results}
    CheckpointFolder(directory).write(
        DENSE_EVAL, lambda p: p.write_text(json.dumps(payload, sort_keys=True, default=str))
    )


def load_dense_eval(directory: str | os.PathLike[str], key: dict) -> dict | None:
    """The saved dense results if they were measured with exactly ``key`` (model, datasets, windows...)."""
    folder = CheckpointFolder(directory)
    if DENSE_EVAL not in (folder.ledger() or []):
        return None
    try:
        payload = json.loads((folder.dir / DENSE_EVAL).read_text())
    except (OSError, ValueError):
        return None
    same = json.loads(json.dumps(key, sort_keys=True, default=str)) == payload.get("key")
    return payload.get("results") if same else None


# ---- writing and reading -----------------------------------------------------------------------------


def _inputs_name(block: int, rank: int) -> str:
    return f"inputs_{block:04d}_rank{rank}.safetensors"


def _stack(batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.detach().cpu() for b in batches]).contiguous()


class Checkpointer:
    """Writes a checkpoint after every block: rank 0 the weights, the ledger and the state, every rank
    its own input shard (all ranks call :meth:`save`)."""

    def __init__(self, directory, settings: dict, calibration: torch.Tensor, model: nn.Module | None = None):
        self.folder = CheckpointFolder(directory)
        self.dir = self.folder.dir
        check_checkpoint_folder(self.dir, flag="checkpoint folder")
        self.fingerprint = fingerprint(settings, calibration, model)
        self.model = model_identity(model)

    def save(
        self,
        index: int,
        weights: dict[str, torch.Tensor],
        hidden: list,
        dense: list | None,
        report: PruneReport,
        parallel,
    ) -> None:
        """``weights``: the block's pruned tensors by full name (rank 0 writes them)."""
        mine = sum(int(h.shape[0]) for h in hidden)
        counts = parallel.gather_list([mine])  # one int per rank, on rank 0
        names = [_inputs_name(index, r) for r in range(parallel.world_size)]
        block_file = f"block_{index:04d}.safetensors"
        if parallel.is_main:
            self.folder.register([block_file, *names, STATE])
        parallel.barrier()  # the names are in the ledger before any rank writes
        tensors = {"hidden": _stack(hidden)} if hidden else {}
        if dense is not None and dense:
            tensors["dense"] = _stack(dense)
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic(self.dir / names[parallel.rank], lambda p: save_file(tensors, str(p)))
        if parallel.is_main:
            tensors_out = {name: w.contiguous().cpu() for name, w in weights.items()}
            _atomic(self.dir / block_file, lambda p: save_file(tensors_out, str(p)))
        parallel.barrier()  # every shard is on disk before the state points at them
        if not parallel.is_main:
            return
        state = {
            "fingerprint": self.fingerprint,
            "model": self.model,
            "next_block": index + 1,
            "inputs": {"files": names, "windows": [int(c) for c in counts], "dense": dense is not None},
            "report": report.to_dict(),
        }
        _atomic(self.dir / STATE, lambda p: p.write_text(json.dumps(state, default=str)))
        stale = [n for n in self.folder.ledger() or [] if n.startswith("inputs_") and n not in names]
        self.folder.remove(stale)


@dataclass
class CheckpointState:
    directory: Path
    next_block: int
    hidden: list
    dense: list | None
    report: PruneReport

    def weights_for(self, index: int) -> dict[str, torch.Tensor]:
        path = self.directory / f"block_{index:04d}.safetensors"
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {self.directory} is missing {path.name}; start again without --resume"
            )
        return load_file(str(path))


def _read_windows(directory: Path, inputs: dict, key: str, start: int, stop: int) -> torch.Tensor:
    """Windows ``start … stop-1`` of the stream ``key``, read from the shards that hold them (lazily:
    each rank reads only its own rows)."""
    parts = []
    offset = 0
    for name, count in zip(inputs["files"], inputs["windows"]):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            with safe_open(str(directory / name), framework="pt") as f:
                parts.append(f.get_slice(key)[lo - offset : hi - offset])
        offset += count
    if offset < stop:
        raise ValueError(f"the checkpoint holds {offset} calibration windows, {stop} are needed")
    return torch.cat(parts)


def load_checkpoint(
    directory,
    settings: dict,
    calibration: torch.Tensor,
    model: nn.Module | None = None,
    parallel=None,
    batch_size: int = 1,
) -> CheckpointState:
    """Read a checkpoint, check it was made with the same settings, calibration tokens and model, and
    return this rank's block inputs in batches of ``batch_size`` (whatever batching and number of
    processes wrote them)."""
    from .parallel import single_process

    parallel = parallel or single_process()
    directory = Path(directory) if directory else None
    if directory is None or not (directory / STATE).exists():
        raise CheckpointError(
            f"nothing to resume: no checkpoint ({STATE}) in {directory}; run without --resume to start fresh"
        )
    try:
        state = json.loads((directory / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {directory / STATE} is unreadable ({exc}); start again without --resume"
        ) from None
    if state.get("fingerprint") != fingerprint(settings, calibration, model):
        if state.get("model") != model_identity(model):
            raise CheckpointError(
                f"checkpoint in {directory} was made with a different model (its config or weights differ); "
                "resume with the model that started the run, or start fresh without --resume"
            )
        raise CheckpointError(
            f"checkpoint in {directory} was made with different settings or calibration data; "
            "use the same command line to resume, or start fresh without --resume"
        )
    try:
        inputs = state["inputs"]
        # this rank's windows under the current sharding, found by sharding the window indices themselves
        mine = parallel.shard(torch.arange(calibration.shape[0]).unsqueeze(1), batch_size)[:, 0]
        start, stop = int(mine[0]), int(mine[-1]) + 1
        hidden = list(torch.split(_read_windows(directory, inputs, "hidden", start, stop), batch_size))
        dense = None
        if inputs.get("dense"):
            dense = list(torch.split(_read_windows(directory, inputs, "dense", start, stop), batch_size))
        report = PruneReport.from_dict(state["report"])
        next_block = int(state["next_block"])
    except Exception as exc:  # a missing/truncated file or an older format: say so, do not crash
        raise CheckpointError(
            f"checkpoint {directory} is incomplete or corrupt ({type(exc).__name__}: {exc}); "
            "start again without --resume"
        ) from None
    return CheckpointState(directory, next_block, hidden, dense, report)
