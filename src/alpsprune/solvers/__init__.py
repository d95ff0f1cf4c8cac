"""Layer solvers: pure tensor maths, registered by name. Importing this package registers them all."""

from . import alps, dsnot, magnitude, sparsegpt, wanda  # noqa: F401  (registration side effects)
from .base import SOLVERS, PruneResult, prune_layer, solver_options

__all__ = ["SOLVERS", "PruneResult", "prune_layer", "solver_options"]
