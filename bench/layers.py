"""Layer benchmark (issue 2): relative error and seconds of every method on real and synthetic layers.

Real layers: the (weight, gram) pairs of the bundled SmolLM2-135M captured by
``bench/capture_grams.py`` (captured on first use, then cached outside the repository). Synthetic
layers: random weights with correlated-input grams (see ``benchlib.synthetic_layer``).

Every timed solver call gets a fresh :class:`alpsprune.Gram` (no cached eigendecomposition or
Cholesky), so ALPS's seconds include its eigendecomposition and SparseGPT's its Cholesky, as for a
layer whose input no other layer shares. The factorisation time of each distinct input is also
reported once (``factor_seconds`` in the JSON) to show what sharing saves for q/k/v and gate/up.

Usage::

    python bench/layers.py --quick                    # smoke run: one block, one synthetic size
    python bench/layers.py                            # all cached blocks, 512/1024/2048 synthetic
    python bench/layers.py --sizes 4096 --layers mlp  # add 4096×4096, real MLP layers only
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch
from benchlib import (
    METHODS,
    PATTERNS,
    RESULTS_DIR,
    estimate_alps_seconds,
    fmt_num,
    fmt_sci,
    format_table,
    fresh_gram,
    geomean,
    jsonable_info,
    machine_info,
    machine_rates,
    parse_list,
    parse_size,
    pattern_kwargs,
    size_label,
    synthetic_layer,
    write_json,
)
from capture_grams import CaptureSettings, add_capture_args, load_pairs, settings_from_args

import alpsprune
from alpsprune.stats import Gram

DEFAULT_SIZES = ("512", "1024", "2048")
QUICK_BLOCK = 14


def run_layer(
    group: str,
    name: str,
    weight: torch.Tensor,
    gram: Gram,
    methods: list[str],
    patterns: list[str],
) -> list[dict]:
    """Every method × pattern on one layer; each call on a fresh Gram (pays its own factorisation)."""
    rows = []
    for pattern in patterns:
        for method in methods:
            g = fresh_gram(gram)
            t0 = time.perf_counter()
            res = alpsprune.prune_layer(weight, g, method=method, **pattern_kwargs(pattern))
            wall = time.perf_counter() - t0
            info = jsonable_info(res.info)
            info.pop("support_changes", None)
            rows.append(
                {
                    "group": group,
                    "layer": name,
                    "shape": list(weight.shape),
                    "pattern": pattern,
                    "method": method,
                    "error": res.error,
                    "seconds": wall,
                    "info": info,
                }
            )
        msg = "  ".join(f"{r['method']} {r['error']:.3e}/{r['seconds']:.2f}s" for r in rows[-len(methods) :])
        print(f"  {name} @ {pattern}: {msg}", flush=True)
    return rows


def factor_seconds(gram: Gram) -> dict[str, float]:
    """Seconds of the ALPS eigendecomposition on a fresh copy of ``gram`` (shared per distinct input)."""
    g = fresh_gram(gram)
    t0 = time.perf_counter()
    g.scaled_eig(0.01, torch.float32)  # the dtype ALPS uses by default
    return {"eig_seconds": time.perf_counter() - t0}


def summarise(rows: list[dict], methods: list[str], patterns: list[str]) -> list[dict]:
    """Per group × pattern: geomean error and summed seconds per method, ALPS/SparseGPT ratios."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        for pattern in patterns:
            sel = [r for r in rows if r["group"] == group and r["pattern"] == pattern]
            if not sel:
                continue
            entry: dict = {"group": group, "pattern": pattern, "layers": len({r["layer"] for r in sel})}
            for m in methods:
                ms = [r for r in sel if r["method"] == m]
                entry[m] = {
                    "error_geomean": geomean(r["error"] for r in ms),
                    "seconds_total": sum(r["seconds"] for r in ms),
                }
            alps = {r["layer"]: r for r in sel if r["method"] == "alps"}
            sgpt = {r["layer"]: r for r in sel if r["method"] == "sparsegpt"}
            common = [n for n in alps if n in sgpt]
            if common:
                entry["alps_over_sparsegpt_error"] = geomean(
                    alps[n]["error"] / sgpt[n]["error"] for n in common if sgpt[n]["error"] > 0
                )
                entry["alps_over_sparsegpt_time"] = sum(alps[n]["seconds"] for n in common) / max(
                    sum(sgpt[n]["seconds"] for n in common), 1e-12
                )
                iters = [alps[n]["info"].get("iterations") for n in common]
                iters = [i for i in iters if i is not None]
                entry["alps_iterations_mean"] = sum(iters) / len(iters) if iters else None
                entry["alps_iterations_max"] = max(iters) if iters else None
            out.append(entry)
    return out


def print_summary(summary: list[dict], methods: list[str]) -> None:
    headers = ["group", "pattern", "n"]
    headers += [f"{m} err" for m in methods] + [f"{m} s" for m in methods]
    headers += ["ALPS/SGPT err", "ALPS/SGPT time", "ALPS iters"]
    rows = []
    for e in summary:
        row = [e["group"], e["pattern"], e["layers"]]
        row += [fmt_sci(e[m]["error_geomean"]) for m in methods]
        row += [fmt_num(e[m]["seconds_total"]) for m in methods]
        row += [
            fmt_num(e.get("alps_over_sparsegpt_error"), 3),
            fmt_num(e.get("alps_over_sparsegpt_time"), 2),
            "-"
            if e.get("alps_iterations_mean") is None
            else f"{e['alps_iterations_mean']:.0f} (max {e['alps_iterations_max']})",
        ]
        rows.append(row)
    print(format_table(headers, rows))
    print("err = geometric mean of relative error over the group's layers; s = summed seconds per method")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    p.add_argument("--sparsities", default=",".join(PATTERNS), help="comma list: fractions and/or N:M")
    p.add_argument("--layers", default=None, help="regex on real layer names (re.search), e.g. 'mlp|o_proj'")
    p.add_argument("--blocks", default=None, help="comma list of real blocks (default: all cached, 0,14,29)")
    p.add_argument(
        "--sizes",
        default=",".join(DEFAULT_SIZES),
        help="synthetic sizes N (N×N) or OUTxIN; '+4096' appends to the defaults; 'none' to skip",
    )
    p.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 layers")
    p.add_argument(
        "--max-alps-seconds",
        type=float,
        default=120.0,
        help="skip synthetic sizes whose estimated ALPS time per call exceeds this",
    )
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic layers")
    p.add_argument(
        "--quick", action="store_true", help=f"smoke run: real block {QUICK_BLOCK} + synthetic 1024"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--output", type=Path, default=None, help="JSON output (default bench/results/layers.json)"
    )
    add_capture_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    methods = parse_list(args.methods)
    patterns = parse_list(args.sparsities)
    for m in methods:
        alpsprune.solver_options(m)  # raises for an unknown method
    sizes_arg = args.sizes
    if sizes_arg.startswith("+"):
        sizes_arg = ",".join(DEFAULT_SIZES) + "," + sizes_arg[1:]
    sizes = [] if sizes_arg.strip().lower() == "none" else [parse_size(s) for s in parse_list(sizes_arg)]
    blocks = [int(b) for b in parse_list(args.blocks)] if args.blocks else None
    if args.quick:
        sizes, blocks = [(1024, 1024)], [QUICK_BLOCK]
        args.max_alps_seconds = math.inf  # the quick synthetic size always runs

    output = args.output or RESULTS_DIR / ("layers_quick.json" if args.quick else "layers.json")
    t_start = time.perf_counter()
    rates = machine_rates(quick=True)
    print(
        f"machine: fp32 matmul {rates['matmul_fp32_flops'] / 1e9:.1f} GFLOP/s, fp64 "
        f"{rates['matmul_fp64_flops'] / 1e9:.1f}, eigh fp64 (9n³) {rates['eigh_fp64_flops'] / 1e9:.1f} "
        f"(1 thread {rates['eigh_fp64_flops_1thread'] / 1e9:.1f}); "
        f"threads {torch.get_num_threads()}"
    )
    rows: list[dict] = []
    factors: dict[str, dict] = {}
    skipped: list[dict] = []

    if not args.no_real:
        settings: CaptureSettings = settings_from_args(args)
        pairs = load_pairs(settings, blocks, args.grams_dir)
        if args.layers:
            pattern = re.compile(args.layers)
            pairs = [pr for pr in pairs if pattern.search(pr.name)]
        if args.quick:
            pairs = pairs[:7]
        print(f"real layers: {len(pairs)} from SmolLM2-135M ({settings.tag})")
        for pr in pairs:
            gram = pr.gram()
            if pr.gram_key not in factors:
                factors[pr.gram_key] = factor_seconds(gram)
            rows += run_layer("real", pr.short, pr.weight, gram, methods, patterns)

    for out_f, in_f in sizes:
        label = size_label(out_f, in_f)
        est = estimate_alps_seconds(out_f, in_f, rates)
        if est > args.max_alps_seconds:
            msg = f"skipped synthetic {label}: estimated ALPS {est:.0f} s per call > --max-alps-seconds {args.max_alps_seconds:.0f}"
            print(msg)
            skipped.append({"size": label, "estimated_alps_seconds": est, "reason": msg})
            continue
        print(f"synthetic {label} (estimated ALPS {est:.1f} s per call)")
        weight, gram = synthetic_layer(out_f, in_f, seed=args.synthetic_seed)
        factors[f"syn{label}"] = factor_seconds(gram)
        rows += run_layer(f"syn{label}", f"syn{label}", weight, gram, methods, patterns)

    summary = summarise(rows, methods, patterns)
    print()
    print_summary(summary, methods)
    for s in skipped:
        print(s["reason"])
    payload = {
        "benchmark": "layers",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine_info(), **rates},
        "methods": methods,
        "patterns": patterns,
        "timing_note": "each solver call on a fresh Gram: ALPS seconds include its eigendecomposition, "
        "SparseGPT's its Cholesky",
        "factor_seconds": factors,
        "summary": summary,
        "skipped": skipped,
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }
    write_json(output, payload)
    print(f"wrote {output} ({payload['seconds']:.0f} s)")
    if any(math.isnan(r["error"]) for r in rows):
        sys.exit("some errors are NaN")


if __name__ == "__main__":
    main()
