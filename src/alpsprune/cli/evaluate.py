"""``alpsprune eval``: perplexity and zero-shot accuracy of a (pruned or dense) model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..report import format_table
from .common import (
    HelpFormatter,
    UsageError,
    add_model_arg,
    add_protocol_arg,
    add_verbosity,
    check_device,
    check_dtype,
    check_model_arg,
    default_output,
    parse_list,
    setup_logging,
)

log = logging.getLogger("alpsprune")

EXAMPLES = """
examples:
  alpsprune eval runs/my-run --ppl wiki-excerpt --seqlen 512
  alpsprune eval ./model --ppl wikitext2,c4 --tasks piqa,arc_easy,arc_challenge
  alpsprune eval ./model --tasks my_task --include-path ./tasks --limit 100

Perplexity uses the reference code's text (WikiText-2 test and PTB validation joined with "\\n\\n",
C4: the first 1100 validation documents joined with " ", first 256 windows), non-overlapping
windows, tail dropped; --ppl-protocol auto puts BOS at the start of every window when the
tokenizer adds BOS itself ('papers' = the published stream). Zero-shot tasks need
`pip install 'alpsprune[eval]'` (lm-evaluation-harness); the metric is acc.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity and zero-shot accuracy of a model",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_model_arg(p)
    p.add_argument("--ppl", default="wiki-excerpt", help="comma list of perplexity datasets; 'none' to skip")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma list of lm-eval tasks (paper: piqa,arc_easy,arc_challenge,lambada_openai)",
    )
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length")
    add_protocol_arg(p)
    p.add_argument(
        "--max-windows", type=int, default=None, help="score at most this many windows per dataset"
    )
    p.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task (quick checks)")
    p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAML files")
    p.add_argument("--batch-size", type=int, default=1, help="windows / lm-eval requests per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument(
        "--output", default=None, help="JSON file for the results (default: runs/<time>-<model>-eval.json)"
    )
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args) -> int:
    setup_logging(args)
    if args.seqlen < 8:
        raise UsageError(f"--seqlen must be at least 8, got {args.seqlen}")
    datasets = [d for d in parse_list(args.ppl) if d.lower() != "none"]
    tasks = parse_list(args.tasks)
    if not datasets and not tasks:
        raise UsageError("nothing to evaluate: give --ppl datasets and/or --tasks")
    check_device(args.device)
    check_dtype(args.dtype, args.device)
    check_model_arg(args.model)
    from ..data import resolve_source

    for ds in datasets:
        resolve_source(ds)
    out = Path(args.output) if args.output else default_output(args, "eval").with_suffix(".json")

    from ..evaluation import perplexity, zero_shot
    from ..io import load_model
    from ..pipeline import resolve_device

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.to(resolve_device(args.device))
    results: dict = {
        "model": args.model or "bundled:SmolLM2-135M-Instruct",
        "perplexity": {},
        "zero_shot": {},
    }
    for ds in datasets:
        r = perplexity(
            model,
            tokenizer,
            ds,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            progress=not args.quiet,
            protocol=args.ppl_protocol,
        )
        results["perplexity"][ds] = {
            "protocol": r.protocol,
            "ppl": r.ppl,
            "nll": r.nll,
            "windows": r.windows,
            "seqlen": r.seqlen,
            "seconds": r.seconds,
        }
    if tasks:
        results["zero_shot"] = zero_shot(
            model,
            tokenizer,
            tasks=tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            include_path=args.include_path,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(results_table(results))
    print(f"wrote {out}")
    return 0


def results_table(results: dict) -> str:
    rows = [
        [f"ppl {k}", f"{v['ppl']:.3f}", f"{v['windows']}×{v['seqlen']}"]
        for k, v in results["perplexity"].items()
    ]
    for task, metrics in results.get("zero_shot", {}).items():
        acc = metrics.get("acc")
        rows.append(
            [f"acc {task}", "n/a" if acc is None else f"{acc:.4f}", f"± {metrics.get('acc_stderr') or 0:.4f}"]
        )
    return format_table(["metric", "value", "detail"], rows)
