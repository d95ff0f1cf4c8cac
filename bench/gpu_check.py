"""Per-phase time and peak memory of a real pruning run against the memory plan (``bench/gpu_check.sh``).

Builds a LLaMA-shaped random-weight model (real widths, a few blocks) in bf16 on the host, prunes it
with each method on the chosen device, and records per phase (capture, statistics, solve, propagate)
the wall time and the peak memory: ``torch.cuda.max_memory_allocated`` (reset at every phase change) on
a GPU, the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) on a CPU. Phases are
found by wrapping the pipeline's functions of each phase (whichever of the names below exist), so the
script follows the pipeline without changing it. The plan's numbers are :func:`alpsprune.memory.plan_run`
for the same shape and settings (device bytes on a GPU; device + host on a CPU).

Usage::

    python bench/gpu_check.py --device cuda                       # 7B widths, 2 blocks, 128×2048
    python bench/gpu_check.py --device cpu --hidden 256 --intermediate 688 --nsamples 4 --seqlen 128
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# pipeline functions per phase (names in alpsprune.pipeline; missing ones are skipped)
PHASE_FUNCTIONS = {
    "capture": ("capture_stream", "capture_block_inputs"),
    "statistics": ("input_groups", "collect_grams", "capture_layer_inputs"),
    "solve": ("_solve_layer",),
    "propagate": ("propagate", "_propagate"),
}


class PhaseMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.current: str | None = None

    def _now_peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.current is not None:  # nested (e.g. statistics inside a solve wrapper): count in the outer
            yield
            return
        self.current = name
        self._reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.peaks[name] = max(self.peaks.get(name, 0), self._now_peak())
            self.current = None


def instrument(meter: PhaseMeter) -> list[str]:
    import alpsprune.pipeline as pipeline

    found = []
    for phase, names in PHASE_FUNCTIONS.items():
        for name in names:
            fn = getattr(pipeline, name, None)
            if fn is None:
                continue

            def wrapped(*args, _fn=fn, _phase=phase, **kwargs):
                with meter.phase(_phase):
                    return _fn(*args, **kwargs)

            setattr(pipeline, name, functools.wraps(fn)(wrapped))
            found.append(f"{phase}:{name}")
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--methods", default="alps,sparsegpt")
    p.add_argument("--recipes", default="faithful,default")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument(
        "--max-iter", type=int, default=None, help="ALPS iteration cap (memory does not depend on it)"
    )
    p.add_argument("--output", type=Path, default=RESULTS / "gpu_check.json")
    args = p.parse_args(argv)

    import transformers

    import alpsprune
    from alpsprune.memory import GiB, ModelShape, device_rates, plan_run

    device = torch.device(args.device)
    heads = max(1, args.hidden // 128)
    cfg = {
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": max(4096, args.seqlen),
        "tie_word_embeddings": False,
    }
    dtype = getattr(torch, args.dtype)
    shape = ModelShape.from_config(
        {**cfg, "model_type": "llama"}, f"llama h{args.hidden} i{args.intermediate}"
    )
    rates = device_rates(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows = []
    for method in args.methods.split(","):
        for recipe in args.recipes.split(","):
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype).eval()
            calibration = torch.randint(0, args.vocab, (args.nsamples, args.seqlen))
            meter = PhaseMeter(device)
            found = instrument(meter)
            options = {"max_iter": args.max_iter} if method == "alps" and args.max_iter else {}
            pipeline_opts = (
                {"faithful": True}
                if recipe == "faithful"
                else {"dense_target": True, "allocation": "uniform"}
            )
            t0 = time.perf_counter()
            try:
                alpsprune.prune_model(
                    model,
                    calibration,
                    method=method,
                    sparsity=args.sparsity,
                    device=device,
                    progress=False,
                    **pipeline_opts,
                    **options,
                )
                status = "ok"
            except torch.OutOfMemoryError as exc:
                status = f"out of memory: {exc}"[:200]
            total = time.perf_counter() - t0
            import importlib

            importlib.reload(alpsprune.pipeline)  # undo the wrappers for the next run
            plan = plan_run(
                shape,
                method=method,
                recipe=recipe,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                dtype=args.dtype,
                device_type=device.type,
                device_flops=rates,
            )
            planned = {
                ph.name: (ph.device if device.type == "cuda" else ph.device + ph.host) for ph in plan.phases
            }
            row = {
                "method": method,
                "recipe": recipe,
                "status": status,
                "seconds": total,
                "planned_seconds": plan.seconds,
                "phase_seconds": meter.seconds,
                "measured_peak": meter.peaks,
                "planned_peak": planned,
                "instrumented": found,
            }
            rows.append(row)
            print(f"{method} {recipe}: {status}, {total:.1f} s (plan {plan.seconds['total']:.0f} s)")
            for ph in ("capture", "statistics", "solve", "propagate"):
                if ph in meter.peaks:
                    got, want = meter.peaks[ph] / GiB, planned[ph] / GiB
                    print(
                        f"  {ph:<11} {meter.seconds[ph]:8.1f} s  peak {got:7.2f} GiB  plan {want:7.2f} GiB "
                        f"({want / got - 1:+.0%})"
                    )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    payload = {
        "benchmark": "gpu_check",
        "command": "gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": cfg,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "dtype": args.dtype,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
