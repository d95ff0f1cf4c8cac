"""Sparsity of a saved model, read from its safetensors files without building the model.

Works on any safetensors checkpoint (alpsprune's outputs or anyone's, single file or sharded with an index):
the header gives every tensor's name, dtype and shape; each tensor is then read alone, in row chunks, through
`safetensors.safe_open`, so memory stays at one chunk whatever the model's size.

N:M detection: along the last axis (nn.Linear's input axis; for a 2-D tensor also along the first, GPT-2's
Conv1D layout), for each M in `NM_SIZES` count the non-zeros of every M consecutive weights. The tensor is
N:M when no group has more than N < M non-zeros *and* most groups have exactly N — a pruned pattern fills its
groups, while a chance maximum of an unstructured mask (e.g. no 16-group above 8 at 90% sparsity) does not.
Of several valid patterns the lowest N/M wins, then the smallest M (a 2:4 mask is also 4:8).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AlpsPruneError
from .report import format_table

NM_SIZES = (2, 4, 8, 16)
CHUNK_ELEMENTS = 1 << 24  # elements read at once (64 MiB of float32)
# A matrix with at least this fraction of exact zeros counts as pruned. Dense weights have a few zeros by chance:
# up to 1.03% in the bundled SmolLM2 dequantized from Q4_1 (its embedding), < 0.1% in its linear layers.
SPARSE_AT = 0.1
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}


class InspectError(AlpsPruneError):
    """The path holds no readable safetensors checkpoint."""


@dataclass
class TensorSparsity:
    name: str
    shape: tuple[int, ...]
    dtype: str
    zeros: int
    nm: str | None = (
        None  # e.g. "2:4": at most 2 non-zeros in every 4 consecutive weights, groups mostly full
    )
    nm_axis: int | None = None  # 1: along the input axis (nn.Linear); 0: along the first (Conv1D layout)
    file: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2


@dataclass
class ModelSparsity:
    path: str
    files: list[str]
    tensors: list[TensorSparsity] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # name, dtype, why
    settings: dict[str, Any] | None = None  # config.json["alpsprune"] of an alpsprune output

    def _totals(self, tensors: list[TensorSparsity]) -> dict[str, Any]:
        numel = sum(t.numel for t in tensors)
        zeros = sum(t.zeros for t in tensors)
        return {
            "tensors": len(tensors),
            "parameters": numel,
            "zeros": zeros,
            "sparsity": zeros / numel if numel else 0.0,
        }

    @property
    def sparse_matrices(self) -> list[TensorSparsity]:
        return [t for t in self.tensors if t.is_matrix and t.sparsity >= SPARSE_AT]

    @property
    def pattern(self) -> str | None:
        """The N:M pattern shared by every pruned matrix, None if there are none or they differ."""
        patterns = {t.nm for t in self.sparse_matrices}
        return patterns.pop() if len(patterns) == 1 else None

    @property
    def summary(self) -> dict[str, Any]:
        sparse = self.sparse_matrices
        patterns: dict[str, int] = {}
        for t in sparse:
            key = t.nm or "unstructured"
            patterns[key] = patterns.get(key, 0) + 1
        return {
            "all": self._totals(self.tensors),
            "matrices": self._totals([t for t in self.tensors if t.is_matrix]),
            "sparse_matrices": {**self._totals(sparse), "patterns": patterns},
            "pattern": self.pattern,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "files": self.files,
            "summary": self.summary,
            "settings": self.settings,
            "tensors": [{**asdict(t), "sparsity": t.sparsity} for t in self.tensors],
            "skipped": self.skipped,
        }

    def table(self, everything: bool = False) -> str:
        """Per-tensor table (matrices only unless `everything`) and the overall figures."""
        shown = self.tensors if everything else [t for t in self.tensors if t.is_matrix]
        rows = [
            [
                t.name,
                "x".join(map(str, t.shape)),
                t.dtype,
                f"{t.sparsity:.4f}",
                (t.nm + (" (axis 0)" if t.nm_axis == 0 else "")) if t.nm else "-",
            ]
            for t in shown
        ]
        s = self.summary
        sp = s["sparse_matrices"]
        lines = [format_table(["tensor", "shape", "dtype", "sparsity", "N:M"], rows), ""]
        lines.append(
            f"{sp['tensors']} of {s['matrices']['tensors']} matrices are pruned (>= {SPARSE_AT:.0%} zeros): "
            f"sparsity {sp['sparsity']:.4f} over their {sp['parameters']:,} weights"
            + (f", all {self.pattern}" if self.pattern else "")
            + (
                f" ({', '.join(f'{n} {k}' for k, n in sorted(sp['patterns'].items()))})"
                if len(sp["patterns"]) > 1
                else ""
            )
        )
        lines.append(
            f"whole model: sparsity {s['all']['sparsity']:.4f} of {s['all']['parameters']:,} stored parameters "
            f"in {len(self.files)} file(s)"
        )
        if self.settings:
            recorded = self.settings.get("mask_structure") or self.settings.get("sparsity")
            lines.append(f"recorded by alpsprune: {self.settings.get('method')} at {recorded}")
        if self.skipped:
            lines.append(
                f"not counted: {len(self.skipped)} non-float tensor(s), e.g. {self.skipped[0]['name']}"
            )
        return "\n".join(lines)


# --- the maths: N:M groups ---------------------------------------------------------------------------------


def group_counts(nonzero: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros in every `m` consecutive entries along the last axis of a 2-D boolean tensor, (rows, cols/m)."""
    rows, cols = nonzero.shape
    return nonzero.view(rows, cols // m, m).sum(-1, dtype=torch.int32)


class NMTally:
    """Running per-M maxima and counts of full groups over the chunks of one tensor."""

    def __init__(self, cols: int) -> None:
        self.sizes = [m for m in NM_SIZES if cols % m == 0 and cols >= m]
        self.max = dict.fromkeys(self.sizes, 0)
        self.at_max = dict.fromkeys(self.sizes, 0)
        self.groups = dict.fromkeys(self.sizes, 0)

    def add(self, nonzero: torch.Tensor) -> None:
        for m in self.sizes:
            counts = group_counts(nonzero, m)
            top = int(counts.max()) if counts.numel() else 0
            if top > self.max[m]:
                self.max[m], self.at_max[m] = top, 0
            if top == self.max[m]:
                self.at_max[m] += int((counts == top).sum())
            self.groups[m] += counts.numel()

    def pattern(self) -> tuple[int, int] | None:
        """The tightest valid (N, M): N < M, no group above N, at least half the groups exactly N."""
        valid = [
            (self.max[m], m)
            for m in self.sizes
            if 0 < self.max[m] < m and self.groups[m] and self.at_max[m] >= 0.5 * self.groups[m]
        ]
        return min(valid, key=lambda nm: (nm[0] / nm[1], nm[1])) if valid else None


def tensor_sparsity(
    handle: Any, name: str, file: str = "", chunk_elements: int = CHUNK_ELEMENTS
) -> TensorSparsity | None:
    """Zeros and N:M pattern of tensor `name` of an open safetensors file, read in chunks of whole rows
    (along the first axis, a multiple of the largest M rows, so axis-0 groups never straddle two chunks).
    None for non-float tensors (quantized or packed integers, masks)."""
    piece = handle.get_slice(name)
    dtype = str(piece.get_dtype())
    shape = tuple(int(x) for x in piece.get_shape())
    if dtype not in _FLOAT_DTYPES:
        return None
    if len(shape) < 2:
        return TensorSparsity(name, shape, dtype, int((handle.get_tensor(name) == 0).sum()), file=file)
    cols = shape[-1]
    row_elems = math.prod(shape[1:])
    lead = max(NM_SIZES)
    step = max(lead, (chunk_elements // max(row_elems, 1)) // lead * lead)
    along_last = NMTally(cols)
    along_first = NMTally(shape[0]) if len(shape) == 2 else None
    zeros = 0
    for start in range(0, shape[0], step):
        chunk = piece[start : start + step]
        nonzero = (chunk != 0).reshape(-1, cols)
        zeros += nonzero.numel() - int(nonzero.sum())
        along_last.add(nonzero)
        if along_first is not None:  # chunks start at multiples of every M, so groups stay whole
            along_first.add(nonzero.t().contiguous())
    result = TensorSparsity(name, shape, dtype, zeros, file=file)
    for axis, tally in ((1, along_last), (0, along_first)):
        found = tally.pattern() if tally is not None else None
        if found is not None:
            result.nm, result.nm_axis = f"{found[0]}:{found[1]}", axis
            break
    return result


# --- files ---------------------------------------------------------------------------------------------------


def _natural(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def checkpoint_files(path: str | os.PathLike[str]) -> tuple[Path, list[Path]]:
    """(folder, safetensors files) of a checkpoint: a `.safetensors` file, an index JSON, or a folder (its
    index if it has one, else every `*.safetensors` in it).

    :raises InspectError: nothing readable there, or the index names a missing shard.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InspectError(f"{path} does not exist; give a model folder or a .safetensors file")
    if p.is_file() and p.name.endswith(".safetensors"):
        return p.parent, [p]
    if p.is_file() and p.name.endswith(".index.json"):
        folder, indexes = p.parent, [p]
    elif p.is_dir():
        folder, indexes = p, sorted(p.glob("*.safetensors.index.json"))
    else:
        raise InspectError(f"{path} is neither a folder nor a .safetensors / .index.json file")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InspectError(f"cannot read the index {indexes[0]}: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InspectError(f"{indexes[0].name} lists shards that are missing: {', '.join(missing[:3])}")
        return folder, files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted({f.suffix for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".gguf", ".pth")})
        hint = (
            f" (found {', '.join(others)}: load the model and save_pretrained it as safetensors first)"
            if others
            else ""
        )
        raise InspectError(f"no .safetensors files in {folder}{hint}")
    return folder, files


def inspect_checkpoint(path: str | os.PathLike[str], chunk_elements: int = CHUNK_ELEMENTS) -> ModelSparsity:
    """Sparsity of every tensor of a saved model, one tensor (and one chunk of rows) in memory at a time.

    :raises InspectError: no readable safetensors checkpoint at `path`.
    """
    from safetensors import SafetensorError, safe_open

    folder, files = checkpoint_files(path)
    result = ModelSparsity(path=str(path), files=[f.name for f in files])
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in sorted(handle.keys(), key=_natural):
                    found = tensor_sparsity(handle, name, file.name, chunk_elements)
                    if found is None:
                        dtype = str(handle.get_slice(name).get_dtype())
                        result.skipped.append({"name": name, "dtype": dtype, "why": "not a float tensor"})
                    else:
                        result.tensors.append(found)
        except (SafetensorError, OSError) as exc:
            raise InspectError(f"cannot read {file}: {exc}") from None
    try:
        config = json.loads((folder / "config.json").read_text())
        settings = config.get("alpsprune") if isinstance(config, dict) else None
        result.settings = settings if isinstance(settings, dict) else None
    except (OSError, ValueError):
        pass
    return result
