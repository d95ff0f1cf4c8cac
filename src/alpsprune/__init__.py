"""alpsprune: one-shot pruning of LLMs with ALPS and the standard baselines.

Light names are imported eagerly; the model-level API (which pulls in ``transformers``) is
loaded on first use so ``import alpsprune`` and the CLI's argument checks stay fast.
"""

from __future__ import annotations

import importlib

from .masks import relative_error

# Imported eagerly, not through _LAZY: the module is light (transformers is imported inside the call),
# and a lazy attribute named like its own submodule would turn into the module after the first import.
from .oneshot import OneshotResult, oneshot
from .solvers import PruneResult, prune_layer, solver_options
from .sparsity import SparsitySpec
from .stats import Gram

__version__ = "0.1.0"

_LAZY = {
    "prune_model": ".pipeline",
    "Reconstruction": ".reconstruct",
    "PruneReport": ".report",
    "save_pruned": ".io",
    "load_model": ".io",
    "load_tokenizer": ".io",
    "get_calibration": ".data",
    "perplexity": ".evaluation",
    "zero_shot": ".evaluation",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'alpsprune' has no attribute {name!r}")


__all__ = [
    "Gram",
    "OneshotResult",
    "oneshot",
    "PruneResult",
    "SparsitySpec",
    "prune_layer",
    "relative_error",
    "solver_options",
    *_LAZY,
]
