"""Non-uniform sparsity allocation on the bundled SmolLM2-135M: ALPS at one sparsity, uniform vs OWL vs
error-curve allocation. Same calibration windows for every run; wall time includes the allocation.

    python bench/allocation_smollm2.py            # → bench/results/allocation_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import alpsprune
from alpsprune.allocation import allocate
from alpsprune.data import get_calibration
from alpsprune.io import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--method", default="alps")
    p.add_argument("--modes", default="uniform,owl,curve")
    p.add_argument("--out", default="bench/results/allocation_smollm2.json")
    p.add_argument("--dense-ppl", type=float, default=None, help="skip the dense evaluation (known value)")
    args = p.parse_args()

    model, tok = load_model(None)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = get_calibration("wiki-excerpt", tok, 32, 512, seed=0)
    ppl_kw = {"seqlen": 512, "max_windows": 40, "progress": False}
    results = {
        "model": "bundled SmolLM2-135M-Instruct",
        "method": args.method,
        "sparsity": args.sparsity,
        "calibration": "wiki-excerpt, 32 x 512, seed 0",
        "eval": "wiki-excerpt test, seqlen 512, 40 windows",
        "threads": torch.get_num_threads(),
        "note": "shared 2-core CPU (other jobs running): wall times are noisy and inflated",
        "dense_ppl": args.dense_ppl or alpsprune.perplexity(model, tok, "wiki-excerpt", **ppl_kw).ppl,
        "runs": {},
    }
    print("dense ppl", results["dense_ppl"], flush=True)
    for mode in args.modes.split(","):
        model.load_state_dict(dense_state)
        t0 = time.perf_counter()
        alloc = None
        if mode != "uniform":
            alloc = allocate(mode, model, calib, args.sparsity, method=args.method, progress=False)
        t_alloc = time.perf_counter() - t0
        report = alpsprune.prune_model(
            model, calib, method=args.method, sparsity=args.sparsity, allocation=alloc, progress=False
        )
        wall = time.perf_counter() - t0
        t_eval = time.perf_counter()
        ppl = alpsprune.perplexity(model, tok, "wiki-excerpt", **ppl_kw).ppl
        print(f"  eval {time.perf_counter() - t_eval:.0f} s", flush=True)
        results["runs"][mode] = {
            "ppl": ppl,
            "wall_seconds": wall,
            "allocation_seconds": t_alloc,
            "targeted_sparsity": report.summary["targeted_sparsity"],
            "mean_layer_error": report.summary["mean_error"],
            "allocation": alloc and {k: round(v, 5) for k, v in alloc.items()},
        }
        print(f"{mode}: ppl {ppl:.3f}, {wall:.0f} s (allocation {t_alloc:.0f} s)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
