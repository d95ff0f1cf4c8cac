"""One call from a model and a dataset to a pruned (and optionally saved) model, shaped like
llm-compressor's ``oneshot``.

It is a thin layer over the library's own steps — :func:`alpsprune.load_model`,
:func:`alpsprune.get_calibration`, :func:`alpsprune.prune_model`, :func:`alpsprune.save_pruned` — with
the CLI's defaults, so ``oneshot(model=..., dataset=...)`` and ``alpsprune prune MODEL --calib ...``
do the same thing::

    import alpsprune

    result = alpsprune.oneshot(
        model="HuggingFaceTB/SmolLM2-135M",
        dataset="wikitext2",
        num_calibration_samples=128,
        max_seq_length=2048,
        method="alps",
        sparsity=0.5,
        mask_structure="2:4",
        output_dir="smollm2-2of4",
    )
    result.report  # a PruneReport; shows as an HTML table in Jupyter
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AlpsPruneError, DataError
from .report import PruneReport
from .sparsity import DEFAULT_SPARSITY, SparsitySpec


@dataclass
class OneshotResult:
    """What :func:`oneshot` produced: the pruned model (pruned in place when one was passed), its
    tokenizer, the per-layer report, and the output folder if one was written."""

    model: nn.Module
    tokenizer: Any
    report: PruneReport
    output_dir: Path | None = None

    def _repr_html_(self) -> str:
        return self.report._repr_html_()


def oneshot(
    model: str | os.PathLike[str] | nn.Module | None = None,
    dataset: Any = "wiki-excerpt",
    *,
    tokenizer: Any = None,
    num_calibration_samples: int | None = None,
    max_seq_length: int | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    method: str = "alps",
    sparsity: float | None = None,
    mask_structure: str | None = None,
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    dampening_frac: float | None = None,
    seed: int = 0,
    splits: str | None = None,
    text_field: str = "text",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    faithful: bool = False,
    sequential: str | None = None,
    dense_target: bool | None = None,
    allocation: dict[str, float] | str | None = None,
    reconstruction: Any = None,
    batch_size: int = 1,
    offload_activations: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **solver_opts: Any,
) -> OneshotResult:
    """Prune ``model`` on calibration windows of ``dataset`` in one call.

    :param model: a Hub id, a local folder or ``.gguf`` file, ``None`` for the bundled SmolLM2-135M, or a
        loaded causal LM (``nn.Module``, pruned in place).
    :param dataset: a source name as in ``--calib`` (``"wiki-excerpt"``, ``"c4"``, ``"wikitext2"``,
        ``"hf:NAME"``, a local file), a ``datasets.Dataset`` with a text column (``text_field``) or a
        tokenized ``input_ids`` column, or a ``(nsamples, seqlen)`` LongTensor of token ids used as is.
    :param tokenizer: a tokenizer or a name to load one; default: the model's (required to tokenize
        text when ``model`` is an ``nn.Module``).
    :param num_calibration_samples, max_seq_length: calibration windows × tokens (default as the CLI:
        32 × 512 for the bundled model, 128 × 2048 otherwise).
    :param output_dir: if given, the pruned model, tokenizer and ``report.json`` are written there
        atomically (:func:`alpsprune.save_pruned`); ``overwrite`` replaces an earlier output.
    :param sparsity, mask_structure: the pattern; both may be given when they agree (``0.5`` with
        ``"2:4"``), ``"0:0"`` is unstructured; neither: ``sparsity=0.6``.
    :param targets, ignore: regexes on full module names (llm-compressor's ``targets``/``ignore``).
    :param dampening_frac: the solvers' ridge ``λ = frac · mean(diag G)``.
    :param splits: the split of a named dataset (default: its calibration split).
    :param solver_opts: further method options, e.g. ``pcg_steps=20``; ``faithful``, ``sequential``,
        ``dense_target``, ``allocation``, ``reconstruction``: the pipeline (see
        :func:`alpsprune.prune_model`).
    """
    from .io import check_output_folder, load_model, load_tokenizer, save_pruned
    from .pipeline import prune_model, resolve_recipe

    # ---- cheap validation first: nothing is loaded for a bad pattern or recipe --------------------------
    if sparsity is None and mask_structure is None:
        sparsity = DEFAULT_SPARSITY
    spec = SparsitySpec.parse(sparsity, mask_structure)
    recipe = {
        "faithful": faithful,
        "sequential": sequential,
        "dense_target": dense_target,
        "reconstruction": reconstruction,
    }
    resolve_recipe(method, spec, **recipe, allocation=allocation)
    if dampening_frac is not None:
        solver_opts["dampening_frac"] = dampening_frac
    hub = {"trust_remote_code": trust_remote_code, "revision": revision, "cache_dir": cache_dir}
    bundled = model is None
    if output_dir is not None:  # the folder rules of save_pruned, checked before anything is loaded
        check_output_folder(output_dir, overwrite, flag="output_dir")

    # ---- model and tokenizer --------------------------------------------------------------------------
    if isinstance(model, nn.Module):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, **hub)
    else:
        model, loaded_tokenizer = load_model(model, dtype=dtype, **hub)
        if tokenizer is None:
            tokenizer = loaded_tokenizer
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, **hub)

    # ---- calibration windows ----------------------------------------------------------------------------
    calibration = _calibration(
        dataset,
        tokenizer,
        bundled,
        num_calibration_samples,
        max_seq_length,
        seed=seed,
        split=splits,
        text_field=text_field,
    )

    report = prune_model(
        model,
        calibration,
        method=method,
        **spec.as_kwargs(),
        targets=targets,
        ignore=ignore,
        device=device,
        **recipe,
        allocation=allocation,
        offload_activations=offload_activations,
        batch_size=batch_size,
        progress=progress,
        **solver_opts,
    )
    report.settings.update({"calib": _describe(dataset), "calib_split": splits, "seed": seed})
    out = None
    if output_dir is not None:
        out = save_pruned(
            model, tokenizer, output_dir, report=report, settings=report.settings, overwrite=overwrite
        )
    return OneshotResult(model=model, tokenizer=tokenizer, report=report, output_dir=out)


def _describe(dataset: Any) -> str:
    if isinstance(dataset, (str, os.PathLike)):
        return os.fspath(dataset)
    if isinstance(dataset, torch.Tensor):
        return f"tokens{tuple(dataset.shape)}"
    return (
        f"{type(dataset).__name__}({len(dataset)} rows)"
        if hasattr(dataset, "__len__")
        else type(dataset).__name__
    )


def _calibration(
    dataset: Any,
    tokenizer: Any,
    bundled: bool,
    nsamples: int | None,
    seqlen: int | None,
    *,
    seed: int,
    split: str | None,
    text_field: str,
) -> torch.Tensor:
    """``(nsamples, seqlen)`` token ids from any accepted ``dataset`` form."""
    from .data import get_calibration

    if isinstance(dataset, torch.Tensor):
        return _from_tensor(dataset, nsamples, seqlen)
    nsamples, seqlen = _shape(bundled, nsamples, seqlen)
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "input_ids" in columns and text_field not in columns:
        return _from_token_rows(dataset["input_ids"], nsamples, seqlen)
    if tokenizer is None:
        raise AlpsPruneError(
            "oneshot needs a tokenizer to turn the dataset's text into tokens: pass tokenizer=... "
            "(or a token tensor / a dataset with an input_ids column as `dataset`)"
        )
    if isinstance(dataset, (str, os.PathLike)):
        return get_calibration(
            os.fspath(dataset), tokenizer, nsamples, seqlen, seed, split=split, text_field=text_field
        )
    if columns is not None:  # a datasets.Dataset of text: the same path as a local .jsonl file
        if text_field not in columns:
            raise DataError(
                f"the dataset has no text column {text_field!r}; its columns: {', '.join(columns)}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "calibration.jsonl"
            dataset.select_columns([text_field]).to_json(path, lines=True, force_ascii=False)
            return get_calibration(str(path), tokenizer, nsamples, seqlen, seed, text_field=text_field)
    raise AlpsPruneError(
        f"dataset must be a source name, a datasets.Dataset or a token tensor, got {type(dataset).__name__}"
    )


def _shape(bundled: bool, nsamples: int | None, seqlen: int | None) -> tuple[int, int]:
    from .cli.common import default_calib_shape

    nsamples, seqlen = default_calib_shape(bundled, nsamples, seqlen)
    if nsamples < 1 or seqlen < 2:
        raise AlpsPruneError(
            f"num_calibration_samples must be >= 1 and max_seq_length >= 2, got {nsamples} and {seqlen}"
        )
    return nsamples, seqlen


def _from_tensor(tokens: torch.Tensor, nsamples: int | None, seqlen: int | None) -> torch.Tensor:
    """A ``(n, L)`` tensor of ids, cut to the first ``nsamples`` rows and ``seqlen`` columns if given."""
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise AlpsPruneError(
            f"a token tensor dataset must be a 2-D integer tensor (nsamples, seqlen), got "
            f"{tuple(tokens.shape)} {tokens.dtype}"
        )
    n, width = tokens.shape
    nsamples = n if nsamples is None else nsamples
    seqlen = width if seqlen is None else seqlen
    if nsamples > n or seqlen > width:
        raise AlpsPruneError(
            f"the token tensor is {n} × {width}; it cannot give {nsamples} samples of {seqlen} tokens"
        )
    return tokens[:nsamples, :seqlen].long()


def _from_token_rows(rows: Any, nsamples: int, seqlen: int) -> torch.Tensor:
    """The first ``nsamples`` tokenized rows with at least ``seqlen`` ids, each cut to ``seqlen``."""
    picked = [list(r[:seqlen]) for r in rows if len(r) >= seqlen][:nsamples]
    if len(picked) < nsamples:
        raise DataError(
            f"the dataset has {len(picked)} input_ids rows of at least {seqlen} tokens; {nsamples} are "
            "needed — lower num_calibration_samples / max_seq_length"
        )
    return torch.tensor(picked, dtype=torch.long)
