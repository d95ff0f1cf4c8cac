"""Figures for reports (PNG).

matplotlib is imported lazily and used only through its object API (a ``Figure`` drawn by an Agg
canvas): pyplot's global backend, figure registry and rcParams are never touched, so importing
alpsprune in a notebook leaves inline plotting as it was.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import PruneReport


def _figure(width: float, height: float):
    """A standalone figure with its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def layer_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``self_attn.q_proj`` (the role of the layer in its block)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :]) or name
    return name


def _plot_by_block(report: PruneReport, value, ylabel: str, title: str, path, log: bool) -> Path:
    """One line per layer role (q_proj, down_proj, ...) of ``value(record)`` against the block index."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in report.layers:
        series[layer_kind(r.name)].append((r.block, value(r)))
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    for kind, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=kind)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_layers(report: PruneReport, path: str | Path, title: str | None = None) -> Path:
    """Relative reconstruction error of every layer, by block, one line per layer role (log scale)."""
    s = report.settings
    pattern = s.get("mask_structure") or f"{s.get('sparsity', 0):.0%}"
    title = title or f"{s.get('method', '')} at {pattern}: per-layer error"
    return _plot_by_block(
        report, lambda r: max(r.error, 1e-12), "relative reconstruction error", title, path, True
    )


def plot_compare(
    rows: list[dict], path: str | Path, dense_ppl: float | None = None, dataset: str = ""
) -> Path:
    """Perplexity vs sparsity per method (log scale); N:M patterns drawn as separate markers.

    ``rows``: dicts with ``method``, ``pattern`` (``"0.7"`` or ``"2:4"``), ``sparsity`` (fraction) and ``ppl``.
    """
    from matplotlib import rcParams  # read only: the active colour cycle

    fig = _figure(8, 5)
    ax = fig.add_subplot()
    methods = sorted({r["method"] for r in rows})
    colors = dict(zip(methods, rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for method in methods:
        unstructured = sorted(
            (r["sparsity"], r["ppl"]) for r in rows if r["method"] == method and ":" not in r["pattern"]
        )
        if unstructured:
            ax.plot(*zip(*unstructured), marker="o", color=colors[method], label=method)
        for r in rows:
            if r["method"] == method and ":" in r["pattern"]:
                ax.scatter([r["sparsity"]], [r["ppl"]], marker="s", s=60, color=colors[method], edgecolor="k")
                ax.annotate(
                    r["pattern"],
                    (r["sparsity"], r["ppl"]),
                    textcoords="offset points",
                    xytext=(5, 3),
                    fontsize=8,
                )
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="gray", linestyle="--", label=f"dense ({dense_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of weights removed; squares: N:M)")
    ax.set_ylabel(f"perplexity{f' ({dataset})' if dataset else ''}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_allocation(report: PruneReport, path: str | Path) -> Path:
    """Per-layer sparsity chosen by a non-uniform allocation, by block and layer role."""
    title = f"per-layer sparsity (overall {report.summary['targeted_sparsity']:.3f})"
    return _plot_by_block(report, lambda r: r.sparsity, "sparsity", title, path, False)
