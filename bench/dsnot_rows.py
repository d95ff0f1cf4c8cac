"""How many rows DSnoT refines on real layers of the bundled SmolLM2-135M (issue 16, item 1).

Calibration: 4 windows × 512 tokens of the Wikipedia excerpt (seed 0); the dense model's inputs of
block 0 ``q_proj`` and block 15 ``down_proj`` are accumulated one sample per call (as the DSnoT
authors' hooks do). A row counts as refined when its DSnoT mask differs from its Wanda mask.
Works against any alpsprune version (it only calls ``prune_layer``), so the same script measures
the rule before and after a change::

    PYTHONPATH=src python bench/dsnot_rows.py --out bench/results/dsnot_rows.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LAYERS = {0: "self_attn.q_proj", 15: "mlp.down_proj"}


def capture(nsamples: int, seqlen: int, sparsity: float) -> list[dict]:
    import alpsprune
    from alpsprune.data import get_calibration
    from alpsprune.models import capture_block_inputs, find_decoder_blocks, get_weight, run_block
    from alpsprune.stats import Gram

    model, tok = alpsprune.load_model(None)
    calib = get_calibration("wiki-excerpt", tok, nsamples, seqlen, seed=0)
    _, stack = find_decoder_blocks(model)
    with torch.no_grad():
        inputs = capture_block_inputs(model, calib, "cpu", batch_size=1)
    hidden = inputs.hidden
    rows = []
    for b in range(max(LAYERS) + 1):
        block = stack[b]
        handle = None
        if b in LAYERS:
            linear = block.get_submodule(LAYERS[b])
            gram = Gram(get_weight(linear).shape[1])
            handle = linear.register_forward_pre_hook(lambda mod, args, g=gram: g.add_batch(args[0]))
        with torch.no_grad():
            hidden = [run_block(block, h, inputs.kwargs_for(b, j)) for j, h in enumerate(hidden)]
        if handle is None:
            continue
        handle.remove()
        W = get_weight(linear).to(torch.float32)
        wanda = alpsprune.prune_layer(W, gram, method="wanda", sparsity=sparsity)
        variants = {"default": {}}
        if "stop_on_sign_flip" in alpsprune.solvers.solver_options("dsnot"):
            variants["with sign check"] = {"stop_on_sign_flip": True}
        for label, opts in variants.items():
            dsnot = alpsprune.prune_layer(W, gram, method="dsnot", sparsity=sparsity, **opts)
            changed = (dsnot.mask != wanda.mask).any(1)
            rows.append(
                {
                    "layer": f"block {b} {LAYERS[b]}",
                    "rule": label,
                    "rows": W.shape[0],
                    "rows_refined": int(changed.sum()),
                    "fraction_refined": float(changed.float().mean()),
                    "swaps": dsnot.info.get("swaps"),
                    "error_wanda": wanda.error,
                    "error_dsnot": dsnot.error,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args()
    rows = capture(args.nsamples, args.seqlen, args.sparsity)
    print("| layer | rule | rows refined | swaps | rel. error Wanda → DSnoT |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['rule']} | {r['rows_refined']}/{r['rows']} ({100 * r['fraction_refined']:.0f}%) "
            f"| {r['swaps']} | {r['error_wanda']:.4f} → {r['error_dsnot']:.4f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
