"""Guards that calibration and evaluation text are disjoint.

Two levels: :func:`check_disjoint` compares the *sources* (same source and same split, or two local
file sets that share a file, is an error), and :func:`assert_no_window_overlap` compares *token
content*: it hashes every run of ``min_run`` consecutive token ids and fails when any calibration
window shares such a run with the evaluation tokens. (The ALPS authors' code drew calibration windows
from the C4 validation shard that it also scored — about half of its C4 test windows were calibration
windows. This module exists so that never happens silently.)
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import OverlapError
from .sources import resolve_source

DEFAULT_MIN_RUN = 128
_MULT = np.uint64(0x9E3779B97F4A7C15)


def check_disjoint(
    calib_source: str, calib_split: str | None, eval_source: str, eval_split: str | None
) -> None:
    """Raise :class:`OverlapError` when calibration and evaluation would read the same text.

    ``None`` splits mean each source's default (calibration split for ``calib_source``, evaluation
    split for ``eval_source``). Different sources always pass, except local file sets sharing a file.
    """
    cal, ev = resolve_source(calib_source), resolve_source(eval_source)
    if cal.kind == "local" and ev.kind == "local":
        shared = sorted(set(cal.files) & set(ev.files))
        if shared:
            raise OverlapError(
                f"calibration source {calib_source!r} and evaluation source {eval_source!r} share "
                f"{len(shared)} file(s), e.g. {shared[0]}; calibrate and evaluate on disjoint files"
            )
        return
    if cal.key != ev.key:
        return
    cs = calib_split or cal.default_split("calib")
    es = eval_split or ev.default_split("eval")
    if cs == es or "all" in (cs, es):
        where = f"split {cs!r}" if cs == es else "overlapping splits"
        fix = (
            f"calibrate on split {cal.default_split('calib')!r} and evaluate on {ev.default_split('eval')!r}"
            if cal.kind != "local"
            else "use different files for calibration and evaluation"
        )
        raise OverlapError(
            f"calibration and evaluation both read {calib_source!r} ({where}): the evaluation would score "
            f"text the pruner was calibrated on; {fix}"
        )


def _rows(t: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError("expected a 1-D token sequence or a 2-D (windows, seqlen) tensor")
    return [np.ascontiguousarray(r, dtype=np.int64) for r in a]


def _hashes(row: np.ndarray, k: int) -> np.ndarray:
    """64-bit rolling (Horner) hash of every length-``k`` run of ``row``."""
    if len(row) < k:
        return np.empty(0, dtype=np.uint64)
    view = np.lib.stride_tricks.sliding_window_view(row.astype(np.uint64), k)
    h = np.zeros(view.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * _MULT + view[:, j] + np.uint64(1)
    return h


def window_overlap(
    calib_windows: torch.Tensor, eval_tokens: torch.Tensor, min_run: int = DEFAULT_MIN_RUN
) -> list[int]:
    """Indices of calibration windows that share a run of ``min_run`` tokens with ``eval_tokens``.

    Hash hits are confirmed by comparing the token ids, so collisions cannot cause false alarms.
    """
    if min_run < 1:
        raise ValueError("min_run must be >= 1")
    eval_rows = _rows(eval_tokens)
    ev_h = [_hashes(r, min_run) for r in eval_rows]
    all_ev = np.concatenate(ev_h) if ev_h else np.empty(0, dtype=np.uint64)
    if all_ev.size == 0:
        return []
    found: list[int] = []
    lookup: dict[int, list[tuple[int, int]]] | None = None
    for i, row in enumerate(_rows(calib_windows)):
        h = _hashes(row, min_run)
        hits = np.flatnonzero(np.isin(h, all_ev))
        if hits.size == 0:
            continue
        if lookup is None:  # positions of candidate hashes in the evaluation rows, built on demand
            lookup = {}
        for pos in hits:
            key = int(h[pos])
            if key not in lookup:
                lookup[key] = [(r, int(p)) for r, eh in enumerate(ev_h) for p in np.flatnonzero(eh == h[pos])]
            run = row[pos : pos + min_run]
            if any(np.array_equal(eval_rows[r][p : p + min_run], run) for r, p in lookup[key]):
                found.append(i)
                break
    return found


def assert_no_window_overlap(
    calib_windows: torch.Tensor, eval_tokens: torch.Tensor, min_run: int = DEFAULT_MIN_RUN
) -> None:
    """Raise :class:`OverlapError` when any calibration window shares ``min_run`` consecutive tokens
    with the evaluation tokens (1-D sequence or 2-D windows)."""
    bad = window_overlap(calib_windows, eval_tokens, min_run)
    if bad:
        n = 1 if calib_windows.dim() == 1 else calib_windows.shape[0]
        raise OverlapError(
            f"{len(bad)} of {n} calibration windows (first: #{bad[0]}) share a run of {min_run} or more "
            f"tokens with the evaluation text; draw calibration data from a different split or source"
        )
