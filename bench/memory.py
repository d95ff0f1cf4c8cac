"""Memory benchmark (issue 15): measured peak RSS of pruning runs against the memory plan.

LLaMA-shaped models with random weights at real widths (hidden 2048 / intermediate 5632, and
hidden 4096 / intermediate 11008), two blocks, float32 on this CPU. Each configuration runs in its own
subprocess (so peaks do not mix); the child builds the model, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``, so model construction does not count), prunes with
:func:`alpsprune.prune_model` and reports ``ru_maxrss``. The prediction is
:func:`alpsprune.memory.plan_run` for the same shape, method, recipe and calibration size (peak over
the capture, statistics, solve and propagate phases: the benchmark does not evaluate).

Also reported: the activation memory of each recipe, measured as the growth of the peak per calibration
sample between the smallest and largest ``nsamples`` of a method (weights, grams and solver workspace
do not grow with the samples), and the default/faithful ratio of those slopes (target ≤ 2.5).

ALPS runs with ``max_iter=6``: its memory does not depend on the iteration count, its time does.

Usage::

    python bench/memory.py --quick          # h2048 only, Wanda + SparseGPT, 8×512 and 16×512
    python bench/memory.py                  # the full sweep below (≈ 30 min on 2 busy cores)
    python bench/memory.py --plans          # only the plan for LLaMA-2-7B / 3-8B / 3-70B at 128×2048 bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"h2048": (2048, 5632), "h4096": (4096, 11008)}
VOCAB = 32000
# (shape, method, recipe, nsamples, seqlen)
FULL_SWEEP = [
    *[("h2048", "wanda", r, n, 512) for r in ("faithful", "default") for n in (8, 32)],
    *[("h2048", "sparsegpt", r, n, 512) for r in ("faithful", "default") for n in (8, 32)],
    *[("h2048", "alps", r, 8, 512) for r in ("faithful", "default")],
    *[("h4096", "wanda", r, 8, 512) for r in ("faithful", "default")],
    ("h4096", "sparsegpt", "faithful", 8, 512),
]
QUICK_SWEEP = [
    *[("h2048", "wanda", r, n, 512) for r in ("faithful", "default") for n in (8, 16)],
    ("h2048", "sparsegpt", "faithful", 8, 512),
]
PLAN_MODELS = ("llama-2-7b", "llama-3-8b", "llama-3-70b")
GPUS = {"80 GB GPU": 80, "24 GB GPU": 24}
PRUNING_PHASES = ("capture", "statistics", "solve", "propagate")


def model_config(shape: str) -> dict:
    hidden, intermediate = SHAPES[shape]
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": 2,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def predict(shape: str, method: str, recipe: str, nsamples: int, seqlen: int) -> dict:
    from alpsprune.memory import ModelShape, plan_run

    model = ModelShape.from_config(model_config(shape), shape)
    plan = plan_run(
        model,
        method=method,
        recipe=recipe,
        nsamples=nsamples,
        seqlen=seqlen,
        dtype="float32",
        device_type="cpu",
        device_flops=(1e11, 1e11),
    )
    phases = {p.name: p.device + p.host for p in plan.phases}
    return {
        "peak": max(phases[p] for p in PRUNING_PHASES),
        "phases": phases,
        "activations": plan.activation_bytes,
    }


# ---- child: one measured run --------------------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> None:
    import torch
    import transformers

    import alpsprune

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{k: v for k, v in model_config(spec["shape"]).items() if k != "model_type"}
    )
    model = transformers.LlamaForCausalLM(config).eval()
    calibration = torch.randint(
        0, VOCAB, (spec["nsamples"], spec["seqlen"]), generator=torch.Generator().manual_seed(0)
    )
    after_build = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on (model construction excluded)
    options = {"max_iter": 6} if spec["method"] == "alps" else {}
    recipe = (
        {"faithful": True}
        if spec["recipe"] == "faithful"
        else {"dense_target": True, "allocation": "uniform"}
    )
    t0 = time.perf_counter()
    alpsprune.prune_model(
        model,
        calibration,
        method=spec["method"],
        sparsity=0.7,
        device="cpu",
        progress=False,
        **recipe,
        **options,
    )
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "vm_hwm": _status("VmHWM"),
                "rss_after_build": after_build,
                "seconds": seconds,
            }
        )
    )


def measure(shape: str, method: str, recipe: str, nsamples: int, seqlen: int) -> dict:
    spec = {"shape": shape, "method": method, "recipe": recipe, "nsamples": nsamples, "seqlen": seqlen}
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ":".join(sys.path)}
    import os

    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed for {spec}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the plans of real models --------------------------------------------------------------------


def real_model_plans() -> list[dict]:
    from alpsprune.memory import CUDA_CONTEXT, GiB, choose_placement, load_shape, plan_run

    rows = []
    for name in PLAN_MODELS:
        shape = load_shape(name)
        for method in ("alps", "sparsegpt"):
            for recipe in ("faithful", "default"):
                plans = {
                    pl: plan_run(
                        shape,
                        method=method,
                        recipe=recipe,
                        nsamples=128,
                        seqlen=2048,
                        dtype="bfloat16",
                        device_type="cuda",
                        placement=pl,
                        device_flops=(19.5e12, 312e12),  # A100 (the README's time column)
                    )
                    for pl in ("device", "host")
                }
                row = {
                    "model": name,
                    "method": method,
                    "recipe": recipe,
                    "device_peak_gib": {pl: p.peak_device / GiB for pl, p in plans.items()},
                    "host_peak_gib": {pl: p.peak_host / GiB for pl, p in plans.items()},
                    "activations_gib": plans["device"].activation_bytes / GiB,
                    "hours_a100": plans["device"].seconds["total"] / 3600,
                }
                for gpu, gib in GPUS.items():
                    row[gpu] = choose_placement(plans, gib * GiB) or "does not fit"
                row["cuda_context_gib"] = CUDA_CONTEXT / GiB
                rows.append(row)
    return rows


def print_plans(rows: list[dict]) -> None:
    print(
        f"{'model':<12}{'method':<10}{'recipe':<9}{'act GiB':>8}{'dev(act on dev)':>16}{'dev(offload)':>13}"
        f"{'host(offload)':>14}{'80 GB':>9}{'24 GB':>13}{'h (A100)':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:<12}{r['method']:<10}{r['recipe']:<9}{r['activations_gib']:>8.1f}"
            f"{r['device_peak_gib']['device']:>16.1f}{r['device_peak_gib']['host']:>13.1f}"
            f"{r['host_peak_gib']['host']:>14.1f}{r['80 GB GPU']:>9}{r['24 GB GPU']:>13}{r['hours_a100']:>9.1f}"
        )


# ---- main ----------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"wanda": "tab:blue", "sparsegpt": "tab:orange", "alps": "tab:green"}
    markers = {"faithful": "o", "default": "s"}
    top = 0.0
    for r in rows:
        x, y = r["predicted"] / 2**30, r["measured"] / 2**30
        top = max(top, x, y)
        ax.scatter(x, y, c=colors[r["method"]], marker=markers[r["recipe"]], s=40)
    ax.plot([0, top * 1.05], [0, top * 1.05], color="gray", lw=1)
    edge = top * 1.05  # band: |predicted / measured − 1| ≤ 15%
    ax.fill_between([0, edge], [0, edge / 1.15], [0, edge / 0.85], color="gray", alpha=0.15)
    for m, c in colors.items():
        ax.scatter([], [], c=c, label=m)
    for rcp, mk in markers.items():
        ax.scatter([], [], c="black", marker=mk, label=rcp)
    ax.set_xlabel("predicted peak (GiB, memory plan)")
    ax.set_ylabel("measured peak RSS (GiB)")
    ax.set_title("memory plan vs peak RSS, 2-block LLaMA, CPU (band ±15%)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def activation_slopes(rows: list[dict]) -> dict:
    """Per-sample growth of the measured and predicted peaks, per (shape, method, recipe) with ≥ 2 sizes."""
    out: dict[str, dict] = {}
    keys = {(r["shape"], r["method"], r["recipe"]) for r in rows}
    for key in sorted(keys):
        pts = sorted(
            (r for r in rows if (r["shape"], r["method"], r["recipe"]) == key), key=lambda r: r["nsamples"]
        )
        if len(pts) < 2 or pts[0]["nsamples"] == pts[-1]["nsamples"]:
            continue
        dn = pts[-1]["nsamples"] - pts[0]["nsamples"]
        out["/".join(key)] = {
            "measured_per_sample": (pts[-1]["measured"] - pts[0]["measured"]) / dn,
            "predicted_per_sample": (pts[-1]["predicted"] - pts[0]["predicted"]) / dn,
            "seqlen": pts[0]["seqlen"],
        }
    ratios = {}
    for key, val in out.items():
        shape, method, recipe = key.split("/")
        faithful = out.get(f"{shape}/{method}/faithful")
        if recipe == "default" and faithful:
            ratios[f"{shape}/{method}"] = {
                "measured": val["measured_per_sample"] / faithful["measured_per_sample"],
                "predicted": val["predicted_per_sample"] / faithful["predicted_per_sample"],
            }
    return {"slopes": out, "default_over_faithful": ratios}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--plans", action="store_true", help="only print the real-model plans")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, default=RESULTS / "memory.json")
    p.add_argument("--tag", default="", help="label stored with the results (e.g. which pipeline)")
    p.add_argument(
        "--configs",
        default=None,
        help="run only these, e.g. h2048:wanda:default:8:512,h4096:wanda:faithful:8:512",
    )
    p.add_argument(
        "--repredict",
        type=Path,
        default=None,
        help="recompute the predictions (and plot) for the measured rows of an earlier memory.json",
    )
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    plans = real_model_plans()
    print_plans(plans)
    if args.plans:
        return
    rows = []
    earlier = json.loads(args.repredict.read_text())["rows"] if args.repredict else None
    sweep = QUICK_SWEEP if args.quick else FULL_SWEEP
    if args.configs:
        sweep = [
            (a, b, c, int(d), int(e)) for a, b, c, d, e in (x.split(":") for x in args.configs.split(","))
        ]
    if earlier is not None:
        sweep = [(r["shape"], r["method"], r["recipe"], r["nsamples"], r["seqlen"]) for r in earlier]
    for number, (shape, method, recipe, nsamples, seqlen) in enumerate(sweep):
        pred = predict(shape, method, recipe, nsamples, seqlen)
        if earlier is not None:
            old = earlier[number]
            got = {
                "ru_maxrss": old["measured"],
                "rss_after_build": old.get("rss_after_build"),
                "seconds": old["seconds"],
            }
        else:
            got = measure(shape, method, recipe, nsamples, seqlen)
        row = {
            "shape": shape,
            "method": method,
            "recipe": recipe,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "measured": got["ru_maxrss"],
            "predicted": pred["peak"],
            "predicted_phases": pred["phases"],
            "predicted_activations": pred["activations"],
            "rss_after_build": got["rss_after_build"],
            "seconds": got["seconds"],
        }
        row["error"] = row["predicted"] / row["measured"] - 1
        rows.append(row)
        print(
            f"{shape} {method:<9} {recipe:<8} {nsamples:>3}×{seqlen}: measured {row['measured'] / 2**30:6.2f} GiB, "
            f"predicted {row['predicted'] / 2**30:6.2f} GiB ({row['error']:+.1%}), {row['seconds']:.0f} s",
            flush=True,
        )
    slopes = activation_slopes(rows)
    for key, val in slopes["default_over_faithful"].items():
        print(
            f"activation ratio default/faithful {key}: measured {val['measured']:.2f}, plan {val['predicted']:.2f}"
        )
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest |predicted/measured − 1|: {worst:.1%} (target ≤ 15%)")
    payload = {
        "benchmark": "memory",
        "command": "memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tag": args.tag,
        "rows": rows,
        "activations": slopes,
        "max_abs_error": worst,
        "real_model_plans": plans,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=1))
    plot(rows, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
