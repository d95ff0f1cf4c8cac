"""What a pruning run did, layer by layer: records, totals, a readable table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LayerRecord:
    name: str  # full dotted module name, e.g. model.layers.3.mlp.down_proj
    block: int
    shape: tuple[int, int]  # (out, in)
    method: str
    pattern: str  # "0.7" or "2:4"
    sparsity: float  # achieved fraction of zeros in the weight
    error: float  # relative reconstruction error (undamped gram)
    seconds: float
    info: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> LayerRecord:
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass
class PruneReport:
    settings: dict = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)  # per block: index, seconds, calibration seconds
    seconds: float = 0.0
    model_sparsity: float | None = None  # zeros / parameters over the whole model
    extra: dict = field(default_factory=dict)  # e.g. perplexities added by the CLI

    @property
    def summary(self) -> dict:
        """Overall sparsity of the targeted weights and of the whole model, mean error, time."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        errors = [r.error for r in self.layers]
        return {
            "layers": len(self.layers),
            "blocks": len({r.block for r in self.layers}),
            "targeted_params": total,
            "targeted_sparsity": zeros / total if total else 0.0,
            "model_sparsity": self.model_sparsity,
            "mean_error": sum(errors) / len(errors) if errors else 0.0,
            "max_error": max(errors) if errors else 0.0,
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "summary": self.summary,
            "layers": [asdict(r) for r in self.layers],
            "blocks": self.blocks,
            "seconds": self.seconds,
            "model_sparsity": self.model_sparsity,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PruneReport:
        return cls(
            settings=d.get("settings", {}),
            layers=[LayerRecord.from_dict(r) for r in d.get("layers", [])],
            blocks=d.get("blocks", []),
            seconds=d.get("seconds", 0.0),
            model_sparsity=d.get("model_sparsity"),
            extra=d.get("extra", {}),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=_jsonable)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> PruneReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self, markdown: bool = False) -> str:
        """Per-layer table (name, shape, sparsity, error, seconds, ALPS iterations)."""
        header, rows = self._layer_rows("x")
        s = self.summary
        footer = (
            f"{s['layers']} layers in {s['blocks']} blocks; targeted sparsity {s['targeted_sparsity']:.4f}"
            + (f", whole model {s['model_sparsity']:.4f}" if s["model_sparsity"] is not None else "")
            + f"; mean error {s['mean_error']:.4e}; {s['seconds']:.1f} s"
        )
        return format_table(header, rows, markdown=markdown) + "\n" + footer

    def __str__(self) -> str:
        return self.table()

    def _layer_rows(self, times: str) -> tuple[list[str], list[list[str]]]:
        """Header and one row of strings per layer (``times`` joins the shape: "x" in text, "×" in HTML)."""
        header = ["layer", "shape", "method", "sparsity", "rel. error", "seconds", "iters"]
        rows = [
            [
                r.name,
                f"{r.shape[0]}{times}{r.shape[1]}",
                r.method,
                f"{r.sparsity:.4f}",
                f"{r.error:.4e}",
                f"{r.seconds:.2f}",
                str(r.info.get("iterations", "")),
            ]
            for r in self.layers
        ]
        return header, rows

    def _repr_html_(self) -> str:
        """Jupyter's rich display: the settings and summary, then the per-layer table."""
        from html import escape

        s = self.summary
        pattern = self.settings.get("mask_structure") or self.settings.get("sparsity")
        caption = (
            f"{self.settings.get('method', '')} at {pattern}: {s['layers']} layers in {s['blocks']} blocks, "
            f"targeted sparsity {s['targeted_sparsity']:.4f}"
            + (f", whole model {s['model_sparsity']:.4f}" if s["model_sparsity"] is not None else "")
            + f", mean error {s['mean_error']:.4e}, {s['seconds']:.1f} s"
        )
        header, rows = self._layer_rows("×")
        head = "".join(f"<th>{escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return (
            f'<table class="alpsprune-report"><caption>{escape(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain aligned text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
