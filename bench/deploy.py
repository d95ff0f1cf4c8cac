"""Issue 17: what can a user do today, on a CPU, to get a faster or smaller model out of the zeros?

Speed: one LLaMA-7B `down_proj`-sized layer (4096 × 11008, float32) applied to a batch of 1, 4 or 16 token
vectors (decoding), one thread, best of `--repeats`: dense `F.linear` against the sparse formats one can use
from torch / scipy without writing a kernel:

- `torch_csr`: `torch.sparse_csr` weight, `W @ Xᵀ` (torch's CPU CSR kernel);
- `scipy_csr`: scipy's CSR × dense (compiled, single-threaded; float32 values, int32 indices);
- `torch_ell`: a padded row format built here (per row the kept values and their column indices, padded to
  the longest row), `y = Σ_k v[:, k] · X[:, idx[:, k]]` with one gather: the least weight traffic torch's
  own ops allow for an unstructured mask (batch 1 only: the gather materialises batch × out × width values).

Masks: unstructured at `--sparsities` (uniformly random positions, what unstructured pruning looks like to a
kernel) and 2:4.

Storage: the same matrix in bfloat16 (the dtype alpsprune saves the bundled model in) as a safetensors-like
dense byte blob, its zlib/lzma-compressed size, and two sparse layouts computed exactly: a bitmask (1 bit per
weight + the kept values) and CSR with int16 column indices. With `--model DIR` the same for a saved model's
`*.safetensors` files (e.g. the main job's output).

    python bench/deploy.py                      # table + bench/results/deploy.json
    python bench/deploy.py --model runs/<run>   # plus the storage of a real pruned model
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import platform
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_best(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds of each function, timed in rounds (every function once per round, back to back), so a
    shared machine's load shifts all of them alike and their ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up (allocations, lazy init)
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def random_mask(out_f: int, in_f: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round((1 - s)·n) kept weights at uniformly random positions."""
    n = out_f * in_f
    keep = torch.randperm(n, generator=gen)[: round((1 - sparsity) * n)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[keep] = True
    return mask.view(out_f, in_f)


def nm_mask(out_f: int, in_f: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(out_f, in_f // m, m, generator=gen)
    keep = scores.argsort(-1)[..., :n]
    return torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(-1, keep, True).view(out_f, in_f)


def ell_format(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the kept values and their column indices, padded (value 0, column 0) to the longest row."""
    mask = weight != 0
    width = int(mask.sum(1).max())
    order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
    return weight.gather(1, order).contiguous(), order.contiguous()


def ell_apply(values: torch.Tensor, cols: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(batch, in) → (batch, out): gather the inputs each row needs, multiply by the kept values, sum."""
    gathered = x[:, cols]  # (batch, out, width)
    return (gathered * values).sum(-1)


def speed_rows(out_f: int, in_f: int, patterns: list[str], batches: list[int], repeats: int) -> list[dict]:
    import scipy.sparse as sp

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

    gen = torch.Generator().manual_seed(0)
    dense_w = torch.randn(out_f, in_f, generator=gen)
    rows = []
    for batch in batches:
        x = torch.randn(batch, in_f, generator=gen)
        x_np = x.numpy().T.copy()  # (in, batch), what scipy's CSR @ dense takes
        for pattern in patterns:
            if ":" in pattern:
                n, m = (int(v) for v in pattern.split(":"))
                mask = nm_mask(out_f, in_f, n, m, gen)
            else:
                mask = random_mask(out_f, in_f, float(pattern), gen)
            w = dense_w * mask
            reference = F.linear(x, w)
            csr = w.to_sparse_csr()
            sci = sp.csr_matrix(w.numpy())
            values, cols = ell_format(w)
            results = {
                "torch_csr": (lambda csr=csr, x=x: (csr @ x.T).T, csr),
                "scipy_csr": (lambda sci=sci, x_np=x_np: sci @ x_np, None),
            }
            if batch == 1:  # the gather materialises batch × out × width values: hopeless beyond one vector
                results["torch_ell"] = (lambda v=values, c=cols, x=x: ell_apply(v, c, x), None)
            for name, (fn, _) in results.items():
                out = fn()
                out = torch.as_tensor(np.asarray(out)).T if name == "scipy_csr" else out
                # every format must compute the same product (float32 sums in another order)
                torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-3)
            fns = {"dense": lambda x=x: F.linear(x, dense_w), **{k: fn for k, (fn, _) in results.items()}}
            best = interleaved_best(fns, repeats)
            row = {"batch": batch, "pattern": pattern, "dense_ms": 1e3 * best["dense"]}
            for name in results:
                row[f"{name}_ms"] = 1e3 * best[name]
                row[f"{name}_speedup"] = best["dense"] / best[name]
            rows.append(row)
            print(
                f"batch {batch:>2}  {pattern:>4}  dense {row['dense_ms']:7.2f} ms  "
                + "  ".join(f"{k} {row[f'{k}_ms']:7.2f} ms ({row[f'{k}_speedup']:.2f}×)" for k in results),
                flush=True,
            )
    return rows


def add_batch_best(rows: list[dict]) -> None:
    """The dense product is the same for every pattern of a batch: its best time over all of them is the
    steadiest reference on a loaded machine; add each format's speed-up against it too."""
    for batch in {r["batch"] for r in rows}:
        same = [r for r in rows if r["batch"] == batch]
        best = min(r["dense_ms"] for r in same)
        for r in same:
            r["dense_best_ms"] = best
            for key in [k for k in r if k.endswith("_ms") and not k.startswith("dense")]:
                r[key.removesuffix("_ms") + "_vs_best"] = best / r[key]


def layout_bytes(weight: torch.Tensor) -> dict[str, int]:
    """Exact bytes of a bfloat16 matrix in the sparse layouts (values in bfloat16)."""
    nnz = int((weight != 0).sum())
    out_f, in_f = weight.shape
    return {
        "dense": weight.numel() * 2,
        "bitmask": nnz * 2 + math.ceil(weight.numel() / 8),  # 1 bit per weight + kept values
        "csr_int16": nnz * (2 + 2) + (out_f + 1) * 4,  # values, int16 columns (in < 32768), int32 row starts
    }


def compressed_bytes(blob: bytes) -> dict[str, int]:
    return {"zlib6": len(zlib.compress(blob, 6)), "lzma1": len(lzma.compress(blob, preset=1))}


def storage_rows(out_f: int, in_f: int, patterns: list[str]) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    dense_w = torch.randn(out_f, in_f, generator=gen) * 0.02
    rows = []
    for pattern in ["0", *patterns]:
        if ":" in pattern:
            n, m = (int(v) for v in pattern.split(":"))
            mask = nm_mask(out_f, in_f, n, m, gen)
        else:
            mask = random_mask(out_f, in_f, float(pattern), gen)
        w = (dense_w * mask).to(torch.bfloat16)
        sizes = layout_bytes(w)
        sizes.update(compressed_bytes(w.view(torch.int16).numpy().tobytes()))
        row = {"pattern": pattern, **{k: v / sizes["dense"] for k, v in sizes.items()}}
        rows.append(row)
        print(
            f"storage {pattern:>4}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "pattern"),
            flush=True,
        )
    return rows


def model_storage(folder: Path) -> dict:
    """Bytes of a saved model's safetensors files: as stored, compressed (zlib level 6, streamed), and in
    the bitmask layout (its matrices with >= 10% zeros; other tensors as stored)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    stored = sum(f.stat().st_size for f in files)
    compressor = zlib.compressobj(6)
    zbytes = 0
    for f in files:
        with open(f, "rb") as handle:
            while block := handle.read(1 << 24):
                zbytes += len(compressor.compress(block))
    zbytes += len(compressor.flush())
    bitmask = 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                t = handle.get_tensor(name)
                size = t.numel() * t.element_size()
                zeros = int((t == 0).sum())
                if t.dim() == 2 and zeros >= 0.1 * t.numel():
                    size = (t.numel() - zeros) * t.element_size() + math.ceil(t.numel() / 8)
                bitmask += size
    return {
        "folder": str(folder),
        "stored_bytes": stored,
        "zlib6_bytes": zbytes,
        "bitmask_bytes": bitmask,
        "zlib6_ratio": zbytes / stored,
        "bitmask_ratio": bitmask / stored,
    }


def speed_table(rows: list[dict]) -> str:
    """Markdown: ms, and the speed-up against the dense time of the same round and (in brackets) against
    the batch's best dense time."""
    lines = [
        "| batch | pattern | dense ms (best of batch) | torch CSR | scipy CSR | torch ELL |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[f'{k}_ms']:.1f} ms, {r[f'{k}_speedup']:.2f}× ({r[f'{k}_vs_best']:.2f}×)"
            if f"{k}_ms" in r
            else "—"
            for k in ("torch_csr", "scipy_csr", "torch_ell")
        ]
        dense = f"{r['dense_ms']:.1f} ({r['dense_best_ms']:.1f})"
        lines.append(f"| {r['batch']} | {r['pattern']} | {dense} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="4096x11008", help="OUTxIN of the layer")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,2:4")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=20, help="timings per case; the best is kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="also measure the storage of this saved model folder")
    parser.add_argument(
        "--model-only",
        action="store_true",
        help="with --model: measure only the model's storage and add it to an existing --output JSON",
    )
    parser.add_argument("--output", default=str(RESULTS / "deploy.json"))
    args = parser.parse_args()
    if args.model_only:
        if not args.model:
            parser.error("--model-only needs --model DIR")
        result = json.loads(Path(args.output).read_text())
        result["model_storage"] = model_storage(Path(args.model))
        print(json.dumps(result["model_storage"], indent=2))
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        return

    torch.set_num_threads(args.threads)
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    patterns = [p.strip() for p in args.sparsities.split(",") if p.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    result = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "mkl": torch.backends.mkl.is_available(),
        },
        "shape": [out_f, in_f],
        "repeats": args.repeats,
        "speed": speed_rows(out_f, in_f, patterns, batches, args.repeats),
        "storage": storage_rows(out_f, in_f, patterns),
    }
    add_batch_best(result["speed"])
    if args.model:
        result["model_storage"] = model_storage(Path(args.model))
        print(json.dumps(result["model_storage"], indent=2))

    print()
    print(speed_table(result["speed"]))
    print(
        "\n| pattern | bitmask | CSR int16 | zlib -6 | lzma -1 |  (bytes / dense bfloat16)\n|---|---|---|---|---|"
    )
    for r in result["storage"]:
        print(
            f"| {r['pattern']} | {r['bitmask']:.3f} | {r['csr_int16']:.3f} | {r['zlib6']:.3f} | {r['lzma1']:.3f} |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
