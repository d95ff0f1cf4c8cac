"""``alpsprune compare``: several methods × sparsities on the same calibration windows, one table."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import OutputError
from ..report import format_table
from ..sparsity import SparsitySpec
from .common import (
    METHODS,
    HelpFormatter,
    UsageError,
    add_eval_args,
    add_loading_args,
    add_model_arg,
    add_pruning_args,
    add_runtime_args,
    add_verbosity,
    calib_shape,
    check_device,
    check_dtype,
    check_model_arg,
    check_output,
    default_output,
    eval_settings,
    load_options,
    parse_list,
    parse_solver_opts,
    pipeline_options,
    setup_logging,
)

log = logging.getLogger("alpsprune")

EXAMPLES = """
examples:
  alpsprune compare                                   # bundled model, 4 methods × 0.5,0.6,0.7,0.8,2:4
  alpsprune compare --methods sparsegpt,alps --sparsities 0.7,2:4 --nsamples 16
  alpsprune compare ./model --calib c4 --eval wikitext2 --device cuda

The model is loaded, the calibration windows drawn and the dense model evaluated once; every run
starts from the same dense weights. Writes compare.json, compare.md (a table like the paper's) and
compare.png (perplexity vs sparsity per method, log scale).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare methods and sparsities on one model",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_model_arg(p)
    add_loading_args(p)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,alps", help="comma list of methods")
    p.add_argument(
        "--sparsities", default="0.5,0.6,0.7,0.8,2:4", help="comma list of sparsities and/or N:M patterns"
    )
    add_pruning_args(p, single=False)
    add_runtime_args(p)
    add_eval_args(p)
    p.add_argument("--output", default=None, help="output folder (default: a new folder under ./runs/)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous comparison (only the files its manifest lists); a folder holding other "
        "files is always refused",
    )
    add_verbosity(p)
    p.set_defaults(func=run)


def opts_for(method: str, opts: dict) -> dict:
    """The solver options that ``method`` accepts (e.g. ``pcg_steps`` goes to ALPS only)."""
    from ..solvers import solver_options

    accepted = solver_options(method)
    return {k: v for k, v in opts.items() if k in accepted}


def parse_patterns(text: str) -> list[SparsitySpec]:
    specs = []
    for item in parse_list(text):
        try:
            specs.append(
                SparsitySpec.parse(mask_structure=item) if ":" in item else SparsitySpec.parse(float(item))
            )
        except ValueError as exc:
            raise UsageError(f"--sparsities item {item!r}: {exc}") from None
    if not specs:
        raise UsageError("--sparsities is empty; give e.g. 0.5,0.7,2:4")
    return specs


def run(args) -> int:
    setup_logging(args)
    methods = parse_list(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(
            f"unknown method(s) {bad or '(none)'} in --methods; choose from {', '.join(METHODS)}"
        )
    specs = parse_patterns(args.sparsities)
    from ..pipeline import resolve_recipe

    for spec in specs:  # contradictions in the pipeline options fail before anything loads
        for method in methods:
            resolve_recipe(method, spec, **pipeline_options(args))
    nsamples, seqlen = calib_shape(args)
    solver_opts = parse_solver_opts(args)
    check_device(args.device)
    check_dtype(args.dtype, args.device)
    check_model_arg(args.model)
    load = load_options(args)
    datasets, eval_seqlen, max_windows = eval_settings(args)
    if not datasets:
        raise UsageError("compare needs at least one --eval dataset")
    from ..data import check_disjoint, resolve_source

    resolve_source(args.calib)
    for ds in datasets:
        resolve_source(ds)
        check_disjoint(args.calib, args.calib_split, ds, None)
    out = Path(args.output) if args.output else default_output(args, "compare")
    check_output(out, args.overwrite)

    from ..data import assert_no_window_overlap, eval_tokens, get_calibration
    from ..io import load_model
    from ..models import get_weight, list_target_layers, set_weight
    from ..pipeline import plan_pruning, prune_model
    from .prune import evaluate

    model, tokenizer = load_model(args.model, dtype=args.dtype, **load)
    for method in methods:  # validate every combination before the first long run
        for spec in specs:
            plan_pruning(
                model,
                method=method,
                **spec.as_kwargs(),
                targets=args.targets,
                ignore=args.ignore,
                **opts_for(method, solver_opts),
            )
    calibration = get_calibration(
        args.calib, tokenizer, nsamples, seqlen, args.seed, split=args.calib_split, text_field=args.text_field
    )
    eval_data = {ds: eval_tokens(ds, tokenizer) for ds in datasets}
    for tokens in eval_data.values():
        assert_no_window_overlap(calibration, tokens)
    dense_weights = {
        name: get_weight(m).clone()
        for name, m in list_target_layers(model, args.targets, args.ignore).items()
    }
    modules = list_target_layers(model, args.targets, args.ignore)
    dense = evaluate(model, tokenizer, eval_data, eval_seqlen, max_windows, args.device, args.quiet)

    rows = []
    for spec in specs:
        for method in methods:
            for name, weight in dense_weights.items():  # every run starts from the dense model
                set_weight(modules[name], weight)
            opts = opts_for(method, solver_opts)
            log.info("== %s at %s", method, spec.label)
            t0 = time.perf_counter()
            report = prune_model(
                model,
                calibration,
                method=method,
                **spec.as_kwargs(),
                targets=args.targets,
                ignore=args.ignore,
                device=args.device,
                **pipeline_options(args),
                offload_activations=args.offload_activations,
                batch_size=args.batch_size,
                progress=not args.quiet,
                **opts,
            )
            seconds = time.perf_counter() - t0
            ppl = evaluate(model, tokenizer, eval_data, eval_seqlen, max_windows, args.device, True)
            rows.append(
                {
                    "method": method,
                    "pattern": spec.label,
                    "sparsity": spec.fraction_pruned,
                    "ppl": ppl[datasets[0]]["ppl"],
                    "perplexity": {k: v["ppl"] for k, v in ppl.items()},
                    "prune_seconds": seconds,
                    "mean_error": report.summary["mean_error"],
                    "targeted_sparsity": report.summary["targeted_sparsity"],
                    "pipeline": {k: report.settings[k] for k in ("sequential", "dense_target", "allocation")},
                }
            )
            log.info("%s %s: ppl %.3f, %.1f s", method, spec.label, rows[-1]["ppl"], seconds)

    result = {
        "model": args.model or "bundled:SmolLM2-135M-Instruct",
        "calibration": {"source": args.calib, "nsamples": nsamples, "seqlen": seqlen, "seed": args.seed},
        "evaluation": {"datasets": datasets, "seqlen": eval_seqlen, "max_windows": max_windows},
        "dense": {k: v["ppl"] for k, v in dense.items()},
        "runs": rows,
    }
    write_outputs(result, out, datasets[0], args.overwrite)
    print(markdown_table(result, datasets[0]))
    print(f"wrote {out}/ (compare.json, compare.md, compare.png)")
    return 0


def markdown_table(result: dict, dataset: str) -> str:
    """Rows: methods; columns: patterns; cells: perplexity (seconds) — the layout of the paper's tables."""
    patterns = list(dict.fromkeys(r["pattern"] for r in result["runs"]))
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    cell = {(r["method"], r["pattern"]): r for r in result["runs"]}
    header = ["method"] + [f"{p}" for p in patterns]
    rows = [["dense"] + [f"{result['dense'][dataset]:.2f}"] * len(patterns)]
    for m in methods:
        rows.append(
            [m]
            + [
                f"{cell[m, p]['ppl']:.2f} ({cell[m, p]['prune_seconds']:.0f}s)" if (m, p) in cell else ""
                for p in patterns
            ]
        )
    return f"Perplexity on {dataset} (pruning seconds):\n\n" + format_table(header, rows, markdown=True)


def write_outputs(result: dict, out: Path, dataset: str, overwrite: bool = False) -> None:
    """compare.json, compare.md, compare.png and a manifest, through the same writer as pruned models:
    only a previous comparison's files (by its manifest) are ever replaced."""
    from ..io import write_owned_folder
    from ..plots import plot_compare

    def write(tmp: Path) -> None:
        (tmp / "compare.json").write_text(json.dumps(result, indent=2))
        (tmp / "compare.md").write_text(
            "# alpsprune compare\n\n"
            + markdown_table(result, dataset)
            + "\n\n![perplexity vs sparsity](compare.png)\n"
        )
        plot_compare(result["runs"], tmp / "compare.png", dense_ppl=result["dense"][dataset], dataset=dataset)

    # checked before the runs (check_output); the writer itself never replaces a file no manifest lists
    try:
        write_owned_folder(out, write, replace_previous=overwrite)
    except OSError as exc:
        raise OutputError(f"cannot write the output folder {out}: {exc}") from exc
