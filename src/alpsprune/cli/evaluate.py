"""``alpsprune eval``: perplexity and zero-shot accuracy of a (pruned or dense) model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..report import format_table
from .common import (
    DTYPES,
    EVAL_MARK,
    HelpFormatter,
    UsageError,
    add_loading_args,
    add_model_arg,
    add_verbosity,
    check_device,
    check_dtype,
    check_model_arg,
    check_output_file,
    default_output,
    load_options,
    parse_list,
    parse_max_memory,
    setup_logging,
)

log = logging.getLogger("alpsprune")

EXAMPLES = """
examples:
  alpsprune eval runs/my-run --ppl wiki-excerpt --seqlen 512
  alpsprune eval ./model --ppl wikitext2,c4 --tasks piqa,arc_easy,arc_challenge
  alpsprune eval ./model --tasks my_task --include-path ./tasks --limit 100
  alpsprune eval ./model --tasks arc_easy --num-fewshot 5 --batch-size auto --output-path lm-eval-out
  alpsprune eval ./big-model --tasks piqa --device-map auto --max-memory 0=20GiB,cpu=100GiB

Perplexity follows the papers' recipe (join with "\\n\\n", tokenize once, non-overlapping windows,
tail dropped; C4: 256 seeded windows of the validation shard). Zero-shot tasks need
`pip install 'alpsprune[eval]'` (lm-evaluation-harness); the metric is acc. The lm-eval flags
(--num-fewshot, --batch-size, --limit, --apply-chat-template, --fewshot-as-multiturn, --output-path,
--log-samples, --include-path) mean what lm_eval's own flags mean and are passed through unchanged.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity and zero-shot accuracy of a model",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_model_arg(p)
    add_loading_args(p, device_map=True)
    p.add_argument("--ppl", default="wiki-excerpt", help="comma list of perplexity datasets; 'none' to skip")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length")
    p.add_argument(
        "--max-windows", type=int, default=None, help="score at most this many windows per dataset"
    )
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1,
        help="perplexity windows / lm-eval requests per forward pass; lm-eval also takes auto or auto:N",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the model in")
    z = p.add_argument_group("lm-eval (zero-/few-shot tasks; lm_eval's flags, same meaning)")
    z.add_argument(
        "--tasks",
        default=None,
        help="comma list of lm-eval tasks (paper: piqa,arc_easy,arc_challenge,lambada_openai)",
    )
    z.add_argument(
        "--num-fewshot", type=int, default=None, help="examples in the few-shot context (default: the task's)"
    )
    z.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="documents per task: a count, or a fraction below 1 (quick checks; default: all)",
    )
    z.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="upper bound for --batch-size auto (default: lm-eval's)",
    )
    z.add_argument(
        "--apply-chat-template",
        nargs="?",
        const=True,
        default=False,
        metavar="TEMPLATE",
        help="format prompts with the tokenizer's chat template (optionally a template name)",
    )
    z.add_argument(
        "--fewshot-as-multiturn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="few-shot examples as a multi-turn chat (default: on with --apply-chat-template)",
    )
    z.add_argument(
        "--output-path",
        default=None,
        help="folder or .json file for lm-eval's full results file, written as lm_eval writes it",
    )
    z.add_argument(
        "--log-samples",
        action="store_true",
        help="also write every sample's prompt and output (needs --output-path)",
    )
    z.add_argument(
        "--include-path",
        default=None,
        help="folder of local lm-eval task YAMLs; their !function tags run Python from it: trusted folders only",
    )
    p.add_argument(
        "--output", default=None, help="JSON file for the results (default: runs/<time>-<model>-eval.json)"
    )
    add_verbosity(p)
    p.set_defaults(func=run)


def _batch_size(text: str) -> int | str:
    """An int, or lm-eval's ``auto`` / ``auto:N``."""
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, auto or auto:N, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _limit(text: str) -> int | float:
    """lm-eval's --limit: below 1 a fraction of each task's documents, otherwise a count."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if not value > 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {text!r}")
    return int(value) if value >= 1 else value


def run(args) -> int:
    setup_logging(args)
    if args.seqlen < 8:
        raise UsageError(f"--seqlen must be at least 8, got {args.seqlen}")
    datasets = [d for d in parse_list(args.ppl) if d.lower() != "none"]
    tasks = parse_list(args.tasks)
    if not datasets and not tasks:
        raise UsageError("nothing to evaluate: give --ppl datasets and/or --tasks")
    # `auto` sizes lm-eval's batches; perplexity windows then go one at a time
    ppl_batch = args.batch_size if isinstance(args.batch_size, int) else 1
    if args.log_samples and not args.output_path:
        raise UsageError("--log-samples needs --output-path (where lm-eval writes the samples)")
    if args.output_path and not tasks:
        raise UsageError("--output-path is lm-eval's results file; give --tasks (or use --output)")
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise UsageError("--fewshot-as-multiturn needs --apply-chat-template")
    max_memory = parse_max_memory(args.max_memory)
    device_map = args.device_map or ("auto" if max_memory else None)
    check_device(args.device)
    check_dtype(args.dtype, args.device)
    check_model_arg(args.model)
    from ..data import resolve_source

    for ds in datasets:
        resolve_source(ds)
    out = Path(args.output) if args.output else default_output(args, "eval").with_suffix(".json")
    check_output_file(out)  # never replace a file alpsprune did not write

    from ..evaluation import perplexity, zero_shot
    from ..io import load_model
    from ..pipeline import resolve_device

    model, tokenizer = load_model(
        args.model, dtype=args.dtype, device_map=device_map, max_memory=max_memory, **load_options(args)
    )
    # with a device map accelerate placed the layers (and moves activations); without one, perplexity
    # places the model itself: resident on the device if it fits, else block by block
    device = resolve_device(args.device) if device_map is None else None
    results: dict = {
        "written_by": EVAL_MARK,
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
            batch_size=ppl_batch,
            progress=not args.quiet,
            device=device,
            offload="auto" if device is not None else False,  # a device map placed the model already
        )
        results["perplexity"][ds] = {
            "ppl": r.ppl,
            "nll": r.nll,
            "windows": r.windows,
            "seqlen": r.seqlen,
            "seconds": r.seconds,
        }
    if tasks:
        if device is not None:
            model.to(device)  # lm-eval runs the whole model's forward: it must fit on the device
        results["lm_eval"] = {
            k: getattr(args, k)
            for k in ("tasks", "num_fewshot", "limit", "batch_size", "apply_chat_template", "output_path")
        }
        results["zero_shot"] = zero_shot(
            model,
            tokenizer,
            tasks=tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            max_batch_size=args.max_batch_size,
            apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            log_samples=args.log_samples,
            output_path=args.output_path,
            model_name=args.model or "SmolLM2-135M-Instruct",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(results_table(results))
    print(f"wrote {out}" + (f" and lm-eval's results under {args.output_path}" if args.output_path else ""))
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
