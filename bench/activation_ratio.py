"""Activation memory of the default recipe against the faithful pipeline (issue 15, item 3).

A LLaMA-shaped model with random weights (default: hidden 2048, intermediate 5632, 2 blocks,
float32) is pruned in a fresh subprocess per recipe on ``nsamples × seqlen`` random tokens (default
64 × 512). To see the data path alone, the solver is replaced by magnitude pruning and the Grams
by empty stand-ins (no ``in × in`` buffers), so what the run adds to the process's memory is the
activations: the streams, the replay cache, the dense weight copy, and one batch of the block's
own forward temporaries. Measured: peak RSS during ``prune_model`` minus RSS just before it
(Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``).

Recipes: ``faithful`` (block statistics, no dense target) and ``default`` (SparseGPT's default:
sub-layer statistics + dense target; ALPS above 60% adds OWL, whose pass happens before pruning and
holds one stream), with the replay cache off (the default), bounded to one stream, and unbounded.
One hidden stream is ``nsamples × seqlen × hidden × 4`` bytes.

    PYTHONPATH=src python bench/activation_ratio.py            # writes bench/results/activation_ratio.json
    PYTHONPATH=/path/to/old/src python bench/activation_ratio.py --label old --recipes faithful,default
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _run(recipe: str, args: argparse.Namespace, queue) -> None:
    import torch
    import transformers

    import alpsprune
    import alpsprune.pipeline as pipeline
    from alpsprune.masks import topk_mask
    from alpsprune.solvers.base import PruneResult

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    class NoGram:  # the data path only: no (in, in) statistics
        def __init__(self, in_features, device="cpu"):
            self.in_features, self.count, self.cross = in_features, 0, None

        def add_batch(self, x, dense_x=None):
            self.count += x.reshape(-1, self.in_features).shape[0]

        def has_nonfinite(self):
            return False

        def free(self):
            pass

    def magnitude(weight, gram, method, sparsity=None, mask_structure=None, **options):
        mask = topk_mask(weight.abs().float(), round((1 - sparsity) * weight.numel())).to(weight.dtype)
        return PruneResult(weight=weight * mask, mask=mask, error=0.0, info={"iterations": 1})

    pipeline.Gram = NoGram
    pipeline.prune_layer = magnitude
    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.blocks,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        vocab_size=1024,
        max_position_embeddings=args.seqlen,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    calib = torch.randint(0, 1024, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    options: dict = {"method": "sparsegpt", "sparsity": 0.5, "progress": False, "device": "cpu"}
    if recipe == "faithful":
        options["faithful"] = True
    else:
        options.update(dense_target=True, sequential="sublayer", allocation="uniform")
        budget = recipe.partition(":")[2]
        if budget:
            stream = args.nsamples * args.seqlen * args.hidden * 4
            options["replay_memory"] = None if budget == "all" else int(float(budget) * stream)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    alpsprune.prune_model(model, calib, **options)
    queue.put({"peak_bytes": _status("VmHWM") - before, "seconds": time.perf_counter() - t0})


def measure(recipe: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(recipe, args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{recipe}: the measuring process failed (exit code {proc.exitcode})")
    return queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--recipes",
        default="faithful,default,default:replay=1,default:replay=all",
        help="faithful | default | default:replay=F (F hidden streams of replay cache, or all)",
    )
    p.add_argument("--label", default="engine")
    p.add_argument("--output", default=str(RESULTS / "activation_ratio.json"))
    args = p.parse_args()
    stream = args.nsamples * args.seqlen * args.hidden * 4
    rows = []
    for recipe in args.recipes.split(","):
        name = recipe.replace("replay=", "")
        got = measure(name, args)
        rows.append({"recipe": recipe, **got, "streams": got["peak_bytes"] / stream})
        print(
            f"{recipe:24s} peak {got['peak_bytes'] / 2**20:8.0f} MiB = {rows[-1]['streams']:5.2f} streams  "
            f"({got['seconds']:.0f} s)",
            flush=True,
        )
    faithful = next((r for r in rows if r["recipe"] == "faithful"), None)
    if faithful:
        for r in rows:
            r["ratio_to_faithful"] = r["peak_bytes"] / faithful["peak_bytes"]
            print(f"{r['recipe']:24s} / faithful = {r['ratio_to_faithful']:.2f}")
    out = Path(args.output)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.label] = {
        "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "blocks")},
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "dtype": "float32",
        "stream_bytes": stream,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
