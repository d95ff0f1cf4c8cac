"""Model-facing layer: find decoder blocks and target linears, read/write `(out, in)` weights, capture block
inputs and run single blocks. Architecture differences are discovered from the module tree, not tabulated."""

from alpsprune.models.capture import BlockInputs, capture_block_inputs, input_hooks, run_block
from alpsprune.models.discovery import (
    Conv1D,
    find_decoder_blocks,
    find_target_linears,
    get_weight,
    is_target_module,
    list_target_layers,
    require_targets,
    set_weight,
    weight_shape,
)

__all__ = [
    "BlockInputs",
    "Conv1D",
    "capture_block_inputs",
    "find_decoder_blocks",
    "find_target_linears",
    "get_weight",
    "input_hooks",
    "is_target_module",
    "list_target_layers",
    "require_targets",
    "run_block",
    "set_weight",
    "weight_shape",
]
