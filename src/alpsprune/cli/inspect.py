"""``alpsprune inspect``: per-layer sparsity and N:M pattern of any saved safetensors model."""

from __future__ import annotations

import json

from .common import HelpFormatter, add_verbosity, setup_logging

EXAMPLES = """
examples:
  alpsprune inspect runs/<run>                        # an alpsprune output
  alpsprune inspect ./Llama-3-8B-2of4 --json > sparsity.json
  alpsprune inspect model-00001-of-00004.safetensors   # one shard

Reads the safetensors headers and then one tensor at a time (in chunks of rows): no model is built, memory
stays small whatever the model's size. N:M = at most N non-zeros in every M consecutive weights of a row
(checked for M = 2, 4, 8, 16), reported when most groups are full. A matrix counts as pruned with >= 10% zeros.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="sparsity and N:M pattern of a saved model, per layer",
        description="Per-tensor sparsity, N:M validity and overall figures of a safetensors checkpoint "
        "(single file or sharded with an index), without loading the model.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", help="model folder, .safetensors file, or .safetensors.index.json")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of tables")
    p.add_argument("--all", action="store_true", help="list 1-D tensors (norms, biases) as well as matrices")
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inspection import inspect_checkpoint

    setup_logging(args)
    result = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table(everything=args.all))
    return 0
