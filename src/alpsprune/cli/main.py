"""``alpsprune`` command line: ``prune``, ``eval``, ``compare`` and ``inspect`` sub-commands on the Python API."""

from __future__ import annotations

import logging
import sys
import traceback

from ..errors import AlpsPruneError
from . import compare, evaluate, inspect, prune
from .common import ArgumentParser, HelpFormatter

DESCRIPTION = """\
One-shot pruning of Hugging Face decoder LMs with ALPS (ADMM + adaptive penalty + PCG refit,
NeurIPS 2024) and the baselines SparseGPT, Wanda, DSnoT and magnitude.

examples:
  alpsprune prune                                 # bundled SmolLM2-135M: prune, evaluate, save
  alpsprune prune ./model --sparsity 0.7 --calib c4 --eval wikitext2
  alpsprune eval runs/<run> --ppl wiki-excerpt --tasks piqa
  alpsprune compare --methods magnitude,wanda,sparsegpt,alps --sparsities 0.5,0.7,2:4
  alpsprune inspect runs/<run>                    # per-layer sparsity and N:M of any saved model
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="alpsprune", description=DESCRIPTION, formatter_class=HelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"alpsprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    prune.add_parser(sub)
    evaluate.add_parser(sub)
    compare.add_parser(sub)
    inspect.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the model card's command line
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from ..stats import using_threads
        from .common import parse_threads

        with using_threads(parse_threads(getattr(args, "threads", None))):
            return int(args.func(args) or 0)
    except AlpsPruneError as exc:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"alpsprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alpsprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line, traceback behind -v
        if getattr(args, "verbose", False):
            traceback.print_exc()
        else:
            logging.getLogger("alpsprune").debug("", exc_info=True)
        print(
            f"alpsprune {args.command}: failed: {type(exc).__name__}: {exc} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
