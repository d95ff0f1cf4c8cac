"""Per-block checkpoints so a killed run resumes where it stopped.

After block ``i`` the folder holds (each file written to a temporary name, then renamed):

* ``block_0000.safetensors`` … ``block_i.safetensors`` — the pruned target weights of each block;
* ``inputs_i.pt`` — the next block's calibration inputs (and the dense stream, if used);
* ``state.json`` — the commit point: settings fingerprint, next block, report so far.

``state.json`` is replaced last, so a crash at any moment leaves either the previous or the new
consistent state; the older ``inputs_*.pt`` is removed only after that.

Disk cost: the pruned weights of the targeted layers (about the model's size in its dtype, since
every block is kept) plus one copy of the calibration activations:
``nsamples × seqlen × hidden × 4`` bytes in float32 (128 × 2048 × 4096 × 4 B = 4.3 GB for a
7B model; twice that with the dense-output target).

Determinism: the same model, calibration tokens (same source, ``nsamples``, ``seqlen`` and seed),
method, options and library versions give the same pruned weights, bit for bit, on CPU — and a run
killed and resumed from a checkpoint gives exactly the weights of an uninterrupted one, since the
saved block inputs are the exact tensors the next block would have seen. Solvers break ties by
index, never by chance. On GPU, cuBLAS reductions and ``torch.linalg.eigh``/Cholesky may differ in
the last bits between runs, GPU models or driver versions, and a support decision on a near-tie
can then flip; results agree to rounding, not bit for bit. Resuming on another device than the
one that wrote the checkpoint is allowed (the device is not part of the fingerprint) but is only
as reproducible as that.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .models import get_weight
from .report import PruneReport

STATE = "state.json"
_UNFINGERPRINTED = ("device", "world_size", "batch_size")  # may change between the run and the resume


def fingerprint(settings: dict, calibration: torch.Tensor) -> str:
    """Hash of what determines the result: settings (minus placement) and the calibration tokens."""
    stable = {k: v for k, v in settings.items() if k not in _UNFINGERPRINTED}
    h = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    h.update(calibration.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Writes a checkpoint after every block (rank 0 writes; all ranks take part in gathering)."""

    def __init__(self, directory, settings: dict, calibration: torch.Tensor):
        self.dir = Path(directory)
        self.fingerprint = fingerprint(settings, calibration)

    def save(
        self, index: int, layers: dict, hidden: list, dense: list | None, report: PruneReport, parallel
    ) -> None:
        hidden = parallel.gather_list(hidden)
        dense = parallel.gather_list(dense) if dense is not None else None
        if not parallel.is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        weights = {name: get_weight(m).contiguous().cpu() for name, m in layers.items()}
        _atomic(self.dir / f"block_{index:04d}.safetensors", lambda p: save_file(weights, str(p)))
        inputs_file = f"inputs_{index:04d}.pt"
        payload = {
            "hidden": [h.cpu() for h in hidden],
            "dense": None if dense is None else [d.cpu() for d in dense],
        }
        _atomic(self.dir / inputs_file, lambda p: torch.save(payload, p))
        state = {
            "fingerprint": self.fingerprint,
            "next_block": index + 1,
            "inputs_file": inputs_file,
            "report": report.to_dict(),
        }
        _atomic(self.dir / STATE, lambda p: p.write_text(json.dumps(state, default=str)))
        for old in self.dir.glob("inputs_*.pt"):
            if old.name != inputs_file:
                old.unlink(missing_ok=True)


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


def load_checkpoint(directory, settings: dict, calibration: torch.Tensor) -> CheckpointState:
    """Read a checkpoint and check it was made with the same settings and calibration tokens."""
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
    if state.get("fingerprint") != fingerprint(settings, calibration):
        raise CheckpointError(
            f"checkpoint in {directory} was made with different settings or calibration data; "
            "use the same command line to resume, or start fresh without --resume"
        )
    try:
        payload = torch.load(directory / state["inputs_file"], weights_only=True)
        report = PruneReport.from_dict(state["report"])
        next_block = int(state["next_block"])
    except Exception as exc:  # a missing/truncated file or an older format: say so, do not crash
        raise CheckpointError(
            f"checkpoint {directory} is incomplete or corrupt ({type(exc).__name__}: {exc}); "
            "start again without --resume"
        ) from None
    return CheckpointState(directory, next_block, payload["hidden"], payload["dense"], report)
