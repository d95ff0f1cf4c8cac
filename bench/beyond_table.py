"""Issue 9 summary: merge ``bench/pipeline.py`` result files into one table and one plot.

For every (method, pattern) it lists each variant's held-out perplexity and pruning time, the change
against the faithful run *of the same file* (same calibration windows, same machine state), and
checks the issue's targets: at 70% the best combination ≥ 10% lower ppl at ≤ 2× the wall time, and
never worse than faithful at 60–80%.

    python bench/beyond_table.py bench/results/beyond_alps.json bench/results/beyond_nm.json \\
        bench/results/beyond_sparsegpt.json --out bench/results/beyond
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMBINATIONS = ("dense+sublayer+owl", "dense+sublayer+curve", "dense+sublayer")


def load_runs(paths: list[Path]) -> tuple[list[dict], float]:
    runs, dense = [], None
    for path in paths:
        data = json.loads(path.read_text())
        dense = data["dense_ppl"] if dense is None else dense
        runs += [{**r, "source": path.name} for r in data["runs"]]
    return runs, dense


def with_baseline(runs: list[dict]) -> list[dict]:
    """Add ``change`` (ppl vs faithful) and ``time_ratio`` (seconds vs faithful) to every run."""
    faithful = {(r["source"], r["method"], r["pattern"]): r for r in runs if r["variant"] == "faithful"}
    out = []
    for r in runs:
        base = faithful.get((r["source"], r["method"], r["pattern"]))
        change = r["ppl"] / base["ppl"] - 1 if base else None
        ratio = r["seconds"] / base["seconds"] if base else None
        out.append({**r, "change": change, "time_ratio": ratio})
    return out


def check_targets(runs: list[dict]) -> list[str]:
    lines = []
    for method in sorted({r["method"] for r in runs}):
        for variant in COMBINATIONS:
            rows = {r["pattern"]: r for r in runs if r["method"] == method and r["variant"] == variant}
            if "0.7" not in rows or rows["0.7"]["change"] is None:
                continue
            r70 = rows["0.7"]
            hit = r70["change"] <= -0.10 and r70["time_ratio"] <= 2.0
            never_worse = all(rows[p]["change"] <= 0 for p in ("0.6", "0.7", "0.8") if p in rows)
            lines.append(
                f"{method} {variant}: 70% {r70['change']:+.1%} ppl at {r70['time_ratio']:.2f}× time "
                f"[{'PASS' if hit else 'FAIL'} ≥10% lower at ≤2×]; never worse at 60–80% "
                f"[{'PASS' if never_worse else 'FAIL'}]"
            )
    return lines


def markdown(runs: list[dict], dense: float) -> str:
    md = [
        f"Dense ppl **{dense:.3f}**. Change and time ratio are against the faithful run of the same "
        "method and pattern in the same benchmark file.",
        "",
        "| method | pattern | variant | ppl | change vs faithful | prune s | time vs faithful |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["method"], r["pattern"])):
        change = "—" if r["variant"] == "faithful" or r["change"] is None else f"{r['change']:+.1%}"
        ratio = "—" if r["variant"] == "faithful" or r["time_ratio"] is None else f"{r['time_ratio']:.2f}×"
        md.append(
            f"| {r['method']} | {r['pattern']} | {r['variant']} | {r['ppl']:.2f} | {change} | "
            f"{r['seconds']:.0f} | {ratio} |"
        )
    return "\n".join(md)


def plot(runs: list[dict], dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in runs})
    fig, axes = plt.subplots(1, len(methods), figsize=(7 * len(methods), 4.5), squeeze=False)
    for ax, method in zip(axes[0], methods):
        rows = [r for r in runs if r["method"] == method]
        patterns = sorted({r["pattern"] for r in rows})
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            xs, ys = [], []
            for j, pattern in enumerate(patterns):
                hit = [r for r in rows if r["pattern"] == pattern and r["variant"] == variant]
                if hit:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(hit[0]["ppl"])
            ax.bar(xs, ys, width, label=variant)
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {dense:.1f}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(patterns)), patterns)
        ax.set_xlabel("sparsity / pattern")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_title(f"{method}: options vs faithful")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="bench/pipeline.py JSON files")
    p.add_argument("--out", type=Path, default=Path("bench/results/beyond"), help="prefix for .md and .png")
    args = p.parse_args()
    runs, dense = load_runs(args.results)
    runs = with_baseline(runs)
    text = markdown(runs, dense) + "\n\n" + "\n".join(f"- {line}" for line in check_targets(runs)) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    plot(runs, dense, args.out.with_suffix(".png"))
    print(text)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
