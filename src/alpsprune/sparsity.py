"""What pattern a pruned weight must have (SPEC §1).

Two kinds:

* **unstructured** ``sparsity=s``: keep exactly ``round((1 - s) * out * in)`` weights of the
  whole layer (layer-wide top-k, not per row).
* **N:M** ``mask_structure="N:M"``: in every group of ``M`` consecutive *input* weights of one
  output row, at most ``N`` are **kept** (non-zero). ``"2:4"`` keeps 2 of every 4 — NVIDIA's
  convention. Note that SparseGPT's and Wanda's code count N as the number *pruned*; we count
  kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsitySpec:
    """A validated sparsity target. Build it with :meth:`parse`."""

    sparsity: float | None = None  # fraction pruned, unstructured
    n_keep: int | None = None  # N of N:M (kept per group)
    m: int | None = None  # M of N:M (group size along the input dimension)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def fraction_pruned(self) -> float:
        return 1.0 - self.n_keep / self.m if self.is_nm else float(self.sparsity)

    def n_kept(self, out_features: int, in_features: int) -> int:
        """Exact number of weights kept in an ``(out, in)`` layer."""
        if self.is_nm:
            return out_features * (in_features // self.m) * self.n_keep
        return round((1.0 - self.sparsity) * out_features * in_features)

    def check_shape(self, out_features: int, in_features: int, name: str = "weight") -> None:
        """Raise ``ValueError`` if the pattern cannot be applied to this shape."""
        if self.is_nm and in_features % self.m != 0:
            raise ValueError(
                f"mask_structure {self.label!r} needs the input dimension of {name} to be a multiple of "
                f"M={self.m}, but it is {in_features}; pick an M that divides {in_features} or exclude "
                f"this layer with `ignore`"
            )

    @property
    def label(self) -> str:
        return f"{self.n_keep}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def as_kwargs(self) -> dict:
        """Keyword arguments for :func:`alpsprune.prune_layer` that rebuild this spec."""
        return {"mask_structure": self.label} if self.is_nm else {"sparsity": self.sparsity}

    def to_dict(self) -> dict:
        if self.is_nm:
            return {"mask_structure": self.label, "sparsity": self.fraction_pruned}
        return {"mask_structure": None, "sparsity": self.sparsity}

    @classmethod
    def parse(cls, sparsity: float | None = None, mask_structure: str | None = None) -> SparsitySpec:
        """Validate and build a spec from exactly one of ``sparsity`` or ``mask_structure``."""
        if (sparsity is None) == (mask_structure is None):
            raise ValueError(
                "give exactly one of `sparsity` (e.g. 0.7, fraction of weights removed) or "
                "`mask_structure` (e.g. '2:4', N kept in every M consecutive inputs)"
            )
        if mask_structure is not None:
            match = _NM_RE.match(str(mask_structure))
            if not match:
                raise ValueError(
                    f"mask_structure must look like 'N:M' with integers (e.g. '2:4'), got {mask_structure!r}"
                )
            n_keep, m = int(match.group(1)), int(match.group(2))
            if m < 1 or n_keep < 1:
                raise ValueError(f"mask_structure {mask_structure!r}: N and M must be at least 1")
            if n_keep > m:
                raise ValueError(
                    f"mask_structure {mask_structure!r}: N (kept per group) cannot exceed M (group size)"
                )
            return cls(n_keep=n_keep, m=m)
        try:
            value = float(sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
        if not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (fraction of weights removed), got {sparsity!r}")
        return cls(sparsity=value)
