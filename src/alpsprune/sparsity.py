"""What pattern a pruned weight must have (SPEC §1).

Two kinds:

* **unstructured** ``sparsity=s``: keep exactly ``round((1 - s) * out * in)`` weights of the
  whole layer (layer-wide top-k, not per row).
* **N:M** ``mask_structure="N:M"``: in every group of ``M`` consecutive *input* weights of one
  output row, at most ``N`` are **kept** (non-zero). ``"2:4"`` keeps 2 of every 4 — NVIDIA's
  convention. Note that SparseGPT's and Wanda's code count N as the number *pruned*; we count
  kept. For patterns where the two readings differ (``1:4``, ``3:4``, ``2:8``: ``2·N != M``) one log
  line says how many weights are kept, so a user who meant the other convention notices.

Both may be given when they agree, as in llm-compressor (``sparsity=0.5, mask_structure="2:4"``);
``mask_structure="0:0"`` means unstructured (llm-compressor's default), so ``sparsity`` decides.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
UNSTRUCTURED = "0:0"  # llm-compressor's spelling of "no N:M pattern"
DEFAULT_SPARSITY = 0.6  # what the CLI and `oneshot` prune when neither sparsity nor a pattern is given
_TOLERANCE = 1e-6  # sparsity=0.5 with "2:4" agree; 0.49 does not
_NOTED: set[str] = set()  # patterns whose "N kept" line was already logged in this process
log = logging.getLogger("alpsprune")


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

    @property
    def convention_note(self) -> str | None:
        """One line saying how many weights an N:M pattern keeps, when reading N as *pruned* would
        give a different pattern (``2·N != M``); ``None`` otherwise."""
        if not self.is_nm or 2 * self.n_keep == self.m:
            return None
        return (
            f"mask_structure {self.label}: keeps {self.n_keep} of every {self.m} weights "
            f"({self.fraction_pruned:.1%} sparsity; N counts weights KEPT, NVIDIA's convention — "
            f"for {self.m - self.n_keep} kept use '{self.m - self.n_keep}:{self.m}')"
        )

    @classmethod
    def parse(cls, sparsity: float | None = None, mask_structure: str | None = None) -> SparsitySpec:
        """Validate and build a spec from ``sparsity`` and/or ``mask_structure``.

        Give one of them, or both when they agree (``0.5`` with ``"2:4"``); ``"0:0"`` is unstructured.
        """
        if (
            mask_structure is not None
            and _NM_RE.match(str(mask_structure))
            and _is_unstructured(mask_structure)
        ):
            if sparsity is None:
                raise ValueError(
                    f"mask_structure {mask_structure!r} means unstructured; give `sparsity` too "
                    "(e.g. sparsity=0.7, the fraction of weights removed)"
                )
            mask_structure = None
        if sparsity is None and mask_structure is None:
            raise ValueError(
                "give `sparsity` (e.g. 0.7, fraction of weights removed) and/or "
                "`mask_structure` (e.g. '2:4', N kept in every M consecutive inputs)"
            )
        value = None if sparsity is None else _check_fraction(sparsity)
        if mask_structure is None:
            return cls(sparsity=value)
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
        spec = cls(n_keep=n_keep, m=m)
        if value is not None and abs(value - spec.fraction_pruned) > _TOLERANCE:
            raise ValueError(
                f"sparsity={value:g} contradicts mask_structure {spec.label!r}, which removes "
                f"{spec.fraction_pruned:g} of the weights ({n_keep} kept of every {m}); drop `sparsity` or "
                f"set it to {spec.fraction_pruned:g}"
            )
        note = spec.convention_note
        if note is not None and spec.label not in _NOTED:
            _NOTED.add(spec.label)
            log.warning(note)
        return spec


def _is_unstructured(mask_structure: str) -> bool:
    n, m = (int(x) for x in str(mask_structure).split(":"))
    return n == 0 and m == 0


def _check_fraction(sparsity: float) -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights removed), got {sparsity!r}")
    return value
