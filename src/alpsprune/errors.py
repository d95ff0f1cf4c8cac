"""Exception types. Each names one kind of user-fixable problem; the CLI prints the message as
one line and exits with code 2. All derive from ``AlpsPruneError`` (a ``ValueError``)."""

from __future__ import annotations


class AlpsPruneError(ValueError):
    """Base class: a problem with the user's input or environment, with a message that says the fix."""


class ModelError(AlpsPruneError):
    """The model cannot be found, loaded, or is not a decoder-only causal LM with discoverable blocks."""


class TargetError(AlpsPruneError):
    """`targets`/`ignore` select no layer, or the sparsity pattern does not fit a targeted layer."""


class DataError(AlpsPruneError):
    """A calibration or evaluation source is missing, unreadable or too small."""


class OverlapError(DataError):
    """Calibration and evaluation text overlap."""


class OutputError(AlpsPruneError):
    """The output folder already holds a complete run, or cannot be written."""


class DeviceError(AlpsPruneError):
    """The requested device does not exist here, or the dtype is unsupported."""


class CheckpointError(AlpsPruneError):
    """A checkpoint cannot be resumed (missing, corrupt, or made with other settings)."""


class SolverError(RuntimeError):
    """A layer solver failed; the message names the layer and the cause."""
