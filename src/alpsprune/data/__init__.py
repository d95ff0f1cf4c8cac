"""Calibration and evaluation data: the standard recipes, offline-capable.

Defaults (the papers' choices): calibration = 128 random windows of 2048 tokens, seed 0, from C4
``en`` train shard 0 (``c4-train.00000-of-01024``), each inside one document; perplexity on
WikiText-2 raw test, PTB validation and C4 validation shard 0 (the first 1100 documents, first
256 windows) — see ``windows`` for which reference code each rule reproduces. ``SOURCES`` lists
every named source with its default splits; ``wiki-excerpt`` and ``lee`` work with no network.
"""

from __future__ import annotations

from .overlap import assert_no_window_overlap, check_disjoint, window_overlap
from .sources import (
    DEFAULT_CALIBRATION,
    DEFAULT_NSAMPLES,
    DEFAULT_SEED,
    DEFAULT_SEQLEN,
    HUB_SOURCES,
    SOURCES,
    HubSpec,
    Source,
    load_text,
    resolve_source,
)
from .windows import (
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    bos_id,
    count_tokens,
    default_eval_windows,
    eval_text,
    eval_tokens,
    eval_windows,
    get_calibration,
    resolve_protocol,
)

__all__ = [
    "DEFAULT_CALIBRATION",
    "DEFAULT_NSAMPLES",
    "DEFAULT_PROTOCOL",
    "DEFAULT_SEED",
    "DEFAULT_SEQLEN",
    "HUB_SOURCES",
    "SOURCES",
    "HubSpec",
    "PROTOCOLS",
    "Source",
    "assert_no_window_overlap",
    "bos_id",
    "check_disjoint",
    "count_tokens",
    "default_eval_windows",
    "eval_text",
    "eval_tokens",
    "eval_windows",
    "get_calibration",
    "load_text",
    "resolve_protocol",
    "resolve_source",
    "window_overlap",
]
