"""Lean statistics (issue 15 item 3): objective change of the lean factorisations on real layers.

On the real SmolLM2-135M layers (cached grams, ``bench/capture_grams.py``):

- SparseGPT: relative reconstruction error with the float32 factorisation (now the default, as in the
  reference implementation) vs the float64 one it replaced, per layer and pattern;
- ALPS: the scaled ``Hn`` is now built in float64 slabs and stored in the solver's precision; the
  benchmark checks that ``Hn``, ``Q`` and ``L`` are bitwise those of the former "whole float64 ``Hn``,
  then cast" path, so ALPS's objective cannot change (and reports the errors for the record).

Usage::

    python bench/lean_stats.py            # blocks 0, 14, 29; patterns 0.6, 0.7, 2:4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from capture_grams import load_pairs

import alpsprune
from alpsprune.solvers import sparsegpt
from alpsprune.stats import Gram

RESULTS = Path(__file__).resolve().parent / "results"


def sparsegpt_error(pair, pattern: str, dtype: torch.dtype | None) -> float:
    original = sparsegpt._factor_attempt
    if dtype is not None:
        sparsegpt._factor_attempt = lambda gram, dead, lam, _dt: original(gram, dead, lam, dtype)
    try:
        kw = {"mask_structure": pattern} if ":" in pattern else {"sparsity": float(pattern)}
        return alpsprune.prune_layer(pair.weight, pair.gram(), method="sparsegpt", **kw).error
    finally:
        sparsegpt._factor_attempt = original


def alps_same_factorisation(pair) -> bool:
    gram: Gram = pair.gram()
    lam = gram.damping(0.01)
    H = gram.G.clone()
    H.diagonal().add_(lam)
    e = torch.sqrt(torch.diagonal(H)) + 1e-8
    old_hn = (H / e[:, None] / e[None, :]).to(torch.float32)
    L, Q = torch.linalg.eigh(old_hn)
    eig = gram.scaled_eig(0.01, torch.float32)
    return bool(torch.equal(eig.Hn, old_hn) and torch.equal(eig.Q, Q) and torch.equal(eig.L, L.clamp_min(0)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="0,14,29")
    p.add_argument("--patterns", default="0.6,0.7,2:4")
    p.add_argument("--output", type=Path, default=RESULTS / "lean_stats.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pairs = load_pairs(blocks=[int(b) for b in args.blocks.split(",")])
    rows = []
    seen_grams = set()
    alps_identical = True
    for pair in pairs:
        if pair.gram_key not in seen_grams:
            seen_grams.add(pair.gram_key)
            alps_identical &= alps_same_factorisation(pair)
        for pattern in args.patterns.split(","):
            e32 = sparsegpt_error(pair, pattern, None)
            e64 = sparsegpt_error(pair, pattern, torch.float64)
            rows.append(
                {
                    "layer": pair.short,
                    "pattern": pattern,
                    "float32": e32,
                    "float64": e64,
                    "rel": e32 / e64 - 1,
                }
            )
            print(
                f"{pair.short:<16} {pattern:>4}  float32 {e32:.5e}  float64 {e64:.5e}  {e32 / e64 - 1:+.3%}",
                flush=True,
            )
    rel = [r["rel"] for r in rows]
    summary = {
        "sparsegpt_max_abs_rel_change": max(abs(x) for x in rel),
        "sparsegpt_mean_rel_change": sum(rel) / len(rel),
        "alps_factorisation_bitwise_identical": alps_identical,
    }
    print(json.dumps(summary, indent=1))
    payload = {
        "benchmark": "lean_stats",
        "command": "lean_stats.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "summary": summary,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
