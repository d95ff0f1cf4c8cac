"""Model-level benchmark: prune the bundled SmolLM2-135M with several methods / options, measure
held-out perplexity, wall time and peak memory of each run. Writes JSON and a markdown table.

Every run is a separate subprocess (so its peak RSS is its own) on the same calibration windows
(same source, seed, count and length). The dense model is evaluated once.

    python bench/pipeline.py                                   # issue 3: 4 methods × 0.5, 0.7, 2:4
    python bench/pipeline.py --methods alps --patterns 0.6,0.7,0.8 --jobs 2 \\
        --variants faithful,sublayer,dense+sublayer,owl,curve,dense+sublayer+owl,dense+sublayer+curve \\
        --out bench/results/beyond_alps                                              # issue 9
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# every option spelled out, so a variant means the same whatever the library's defaults are
_PAPER = {"sequential": "block", "dense_target": False, "allocation": "uniform"}
VARIANTS = {
    "faithful": {"faithful": True},
    "sublayer": {**_PAPER, "sequential": "sublayer"},
    "dense+sublayer": {**_PAPER, "sequential": "sublayer", "dense_target": True},
    "owl": {**_PAPER, "allocation": "owl"},
    "curve": {**_PAPER, "allocation": "curve"},
    "dense+sublayer+owl": {"sequential": "sublayer", "dense_target": True, "allocation": "owl"},
    "dense+sublayer+curve": {"sequential": "sublayer", "dense_target": True, "allocation": "curve"},
    "default": {},  # whatever prune_model does without pipeline options
}


def pattern_kwargs(pattern: str) -> dict:
    return {"mask_structure": pattern} if ":" in pattern else {"sparsity": float(pattern)}


def load(args):
    import alpsprune
    from alpsprune.data import get_calibration

    model, tok = alpsprune.load_model(None)
    calib = get_calibration(args.calib, tok, args.nsamples, args.seqlen, seed=args.seed)
    return model, tok, calib


def evaluate(model, tok, args) -> float:
    import alpsprune

    return alpsprune.perplexity(
        model, tok, args.eval, seqlen=args.eval_seqlen, max_windows=args.max_windows, progress=False
    ).ppl


def run_single(args) -> dict:
    """One pruning run (in its own process): prune, evaluate, report time and peak RSS."""
    import torch

    import alpsprune

    model, tok, calib = load(args)
    options = VARIANTS[args.variant]
    t0 = time.perf_counter()
    report = alpsprune.prune_model(
        model, calib, method=args.method, progress=False, **pattern_kwargs(args.pattern), **options
    )
    seconds = time.perf_counter() - t0
    ppl = evaluate(model, tok, args)
    return {
        "method": args.method,
        "pattern": args.pattern,
        "variant": args.variant,
        "ppl": ppl,
        "seconds": seconds,
        "mean_error": report.summary["mean_error"],
        "targeted_sparsity": report.summary["targeted_sparsity"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "pipeline": {k: report.settings[k] for k in ("sequential", "dense_target", "allocation")},
        "layer_sparsity": {r.name: float(r.pattern) for r in report.layers if ":" not in r.pattern},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,alps")
    p.add_argument("--patterns", default="0.5,0.7,2:4")
    p.add_argument("--variants", default="faithful", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--calib", default="wiki-excerpt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki-excerpt")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--out", default="bench/results/pipeline", help="output prefix (.json and .md are added)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each then gets 1 thread)")
    p.add_argument("--single", nargs=3, metavar=("METHOD", "PATTERN", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.single:
        args.method, args.pattern, args.variant = args.single
        print("RESULT " + json.dumps(run_single(args)))
        return

    model, tok, _ = load(args)
    t0 = time.perf_counter()
    dense = evaluate(model, tok, args)
    eval_seconds = time.perf_counter() - t0
    del model
    print(
        f"dense ppl {dense:.3f} ({args.max_windows} windows × {args.eval_seqlen}, {eval_seconds:.1f} s)",
        flush=True,
    )
    common = [
        "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--seed", str(args.seed), "--eval", args.eval, "--eval-seqlen", str(args.eval_seqlen),
        "--max-windows", str(args.max_windows),
    ]  # fmt: skip
    jobs = [
        (method, pattern, variant)
        for pattern in args.patterns.split(",")
        for method in args.methods.split(",")
        for variant in args.variants.split(",")
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.jobs > 1:  # one core per run, so concurrent runs do not fight over threads
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(
                subprocess.run,
                [sys.executable, __file__, *common, "--single", *job],
                capture_output=True,
                text=True,
                env=env,
            )
            for job in jobs
        ]
        for (method, pattern, variant), future in zip(jobs, futures):
            out = future.result()
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{method} {pattern} {variant} FAILED:\n{out.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(line[7:]))
            r = rows[-1]
            print(
                f"{method:10s} {pattern:5s} {variant:20s} ppl {r['ppl']:10.3f}  {r['seconds']:7.1f} s  "
                f"peak {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    result = {
        "model": "SmolLM2-135M-Instruct (bundled)",
        "calibration": {
            "source": args.calib,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.seed,
        },
        "evaluation": {"dataset": args.eval, "seqlen": args.eval_seqlen, "max_windows": args.max_windows},
        "dense_ppl": dense,
        "eval_seconds_per_model": eval_seconds,
        "runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [
        f"Bundled SmolLM2-135M, calibration {args.nsamples}×{args.seqlen} tokens of {args.calib} (seed {args.seed}); "
        f"perplexity on {args.max_windows} held-out windows of {args.eval_seqlen} tokens ({args.eval}). "
        f"Dense: **{dense:.3f}**.",
        "",
        "| method | pattern | variant | ppl | prune s | peak RSS MB | mean layer error |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['method']} | {r['pattern']} | {r['variant']} | {r['ppl']:.3f} | {r['seconds']:.1f} | "
        f"{r['peak_rss_mb']:.0f} | {r['mean_error']:.4e} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
