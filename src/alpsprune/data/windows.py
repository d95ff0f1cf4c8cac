"""Token windows: random calibration windows and the non-overlapping evaluation windows.

Calibration (:func:`get_calibration`): the source's documents are put in a random order (a
``torch.Generator`` seeded with ``seed``), tokenized without special tokens and joined with the ids
of ``"\\n\\n"`` into a token pool — stopping once the pool holds ``POOL_FACTOR × nsamples × seqlen``
tokens, so a huge source such as the C4 train shard is only partly tokenized — and ``nsamples``
window starts are drawn uniformly from the pool with the same generator. Windows may overlap each
other (as in the standard recipe) and may span document boundaries. The same arguments always give
the same tensor.

Evaluation (:func:`eval_tokens`, :func:`eval_windows`): the standard perplexity recipe — the
evaluation split's rows joined with ``"\\n\\n"``, tokenized once (with the tokenizer's special tokens,
e.g. a leading BOS), cut into non-overlapping ``seqlen`` windows, tail dropped. For ``c4`` a seeded
random choice of 256 of those windows (validation shard 0, seed 0) is scored.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .overlap import assert_no_window_overlap, check_disjoint
from .sources import (
    DEFAULT_NSAMPLES,
    DEFAULT_SEED,
    DEFAULT_SEQLEN,
    Loader,
    load_text,
    resolve_source,
)

POOL_FACTOR = 4
C4_EVAL_WINDOWS = 256
SEPARATOR = "\n\n"
_BATCH_DOCS = 256


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=special, verbose=False)
    return enc["input_ids"]


def _token_pool(
    docs: list[str], tokenizer, generator: torch.Generator | None, limit: int | None
) -> torch.Tensor:
    """Documents (in random order when ``generator`` is given) tokenized and joined with ``"\\n\\n"``,
    until ``limit`` tokens are reached (all documents when ``limit`` is None)."""
    order = torch.randperm(len(docs), generator=generator).tolist() if generator is not None else None
    sep = _ids(tokenizer, [SEPARATOR], special=False)[0]
    chunks: list[list[int]] = []
    total = 0
    for start in range(0, len(docs), _BATCH_DOCS):
        idx = (
            order[start : start + _BATCH_DOCS]
            if order is not None
            else range(start, min(start + _BATCH_DOCS, len(docs)))
        )
        for ids in _ids(tokenizer, [docs[i] for i in idx], special=False):
            if chunks:
                chunks.append(sep)
                total += len(sep)
            chunks.append(ids)
            total += len(ids)
        if limit is not None and total >= limit:
            break
    flat = [t for c in chunks for t in c]
    return torch.tensor(flat, dtype=torch.long)


def count_tokens(
    source: str,
    tokenizer,
    *,
    split: str | None = None,
    text_field: str = "text",
    limit: int | None = None,
    loader: Loader | None = None,
) -> int:
    """Tokens in the calibration text of ``source`` (documents joined as for calibration).

    With ``limit`` the count stops early once it reaches ``limit`` (so ``count >= limit`` is cheap
    to test on a big source)."""
    docs = load_text(source, split, text_field, purpose="calib", loader=loader)
    return int(_token_pool(docs, tokenizer, None, limit).numel())


def get_calibration(
    source: str,
    tokenizer,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = DEFAULT_SEED,
    *,
    split: str | None = None,
    text_field: str = "text",
    exclude: torch.Tensor | str | None = None,
    allow_small: bool = False,
    loader: Loader | None = None,
) -> torch.Tensor:
    """``nsamples`` random ``seqlen``-token windows of ``source`` as a ``(nsamples, seqlen)`` LongTensor.

    ``split`` defaults to the source's calibration split (``train``; C4: train shard 0). The source
    must hold at least ``nsamples × seqlen`` tokens (or, with ``allow_small=True``, ``seqlen`` tokens —
    windows then repeat text); otherwise :class:`DataError` says how many it has. ``exclude`` is the
    evaluation text to stay clear of: a token tensor, or a source name whose evaluation split is
    checked with :func:`check_disjoint` and then token by token (:class:`OverlapError` on overlap).
    """
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    split = split or resolve_source(source).default_split("calib")
    docs = load_text(source, split, text_field, purpose="calib", loader=loader)
    gen = torch.Generator().manual_seed(int(seed))
    needed = nsamples * seqlen
    pool = _token_pool(docs, tokenizer, gen, POOL_FACTOR * needed)
    n = pool.numel()
    if n < (seqlen if allow_small else needed):
        what = (
            f"{seqlen} tokens (one window)" if allow_small else f"{nsamples} × {seqlen} = {needed:,} tokens"
        )
        raise DataError(
            f"calibration source {source!r}" + (f" (split {split})" if split else "") + f" has {n:,} tokens; "
            f"{what} are needed — lower nsamples/seqlen or choose a larger source"
            + ("" if allow_small else " (allow_small=True permits overlapping windows)")
        )
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    windows = torch.stack([pool[s : s + seqlen] for s in starts.tolist()])
    if exclude is not None:
        if isinstance(exclude, str):
            check_disjoint(source, split, exclude, None)
            exclude = eval_tokens(exclude, tokenizer, loader=loader)
        assert_no_window_overlap(windows, exclude)
    return windows


def eval_tokens(
    source: str,
    tokenizer,
    *,
    split: str | None = None,
    text_field: str = "text",
    loader: Loader | None = None,
) -> torch.Tensor:
    """The evaluation text of ``source`` as one 1-D LongTensor: rows joined with ``"\\n\\n"`` and
    tokenized once. ``split`` defaults to the source's evaluation split (WikiText-2: test, PTB:
    validation, C4: validation shard 0, wiki-excerpt / lee: the test articles)."""
    src = resolve_source(source)
    docs = load_text(source, split, text_field, purpose="eval", loader=loader, drop_empty=src.kind != "hub")
    ids = _ids(tokenizer, [SEPARATOR.join(docs)], special=True)[0]
    return torch.tensor(ids, dtype=torch.long)


def default_eval_windows(source: str | torch.Tensor) -> int | None:
    """How many random windows the standard recipe scores for ``source`` (C4: 256), else None (all)."""
    if isinstance(source, str) and source.strip() == "c4":
        return C4_EVAL_WINDOWS
    return None


def eval_windows(
    data: str | torch.Tensor,
    tokenizer=None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    *,
    split: str | None = None,
    text_field: str = "text",
    seed: int = DEFAULT_SEED,
    random_windows: int | None = -1,
    loader: Loader | None = None,
) -> torch.Tensor:
    """Non-overlapping ``(n, seqlen)`` evaluation windows, tail dropped.

    ``data`` is a source name / path (tokenized with :func:`eval_tokens`), a 1-D token tensor, or a
    2-D tensor of ready windows (used as is). ``random_windows=k`` keeps a seeded random choice of
    ``k`` windows (in text order); the default ``-1`` means the source's standard choice (C4: 256,
    others: all). ``max_windows`` then keeps the first ``max_windows``.
    """
    if random_windows == -1:
        random_windows = default_eval_windows(data)
    if isinstance(data, torch.Tensor):
        tokens = data.long()
    else:
        if tokenizer is None:
            raise DataError("a tokenizer is needed to evaluate on a text source")
        tokens = eval_tokens(data, tokenizer, split=split, text_field=text_field, loader=loader)
    if tokens.dim() == 2:
        windows = tokens
    elif tokens.dim() == 1:
        n = tokens.numel() // seqlen
        if n == 0:
            raise DataError(
                f"evaluation text has {tokens.numel():,} tokens, fewer than one window of {seqlen}"
            )
        windows = tokens[: n * seqlen].view(n, seqlen)
    else:
        raise DataError("evaluation tokens must be a 1-D sequence or a 2-D tensor of windows")
    if random_windows is not None and windows.shape[0] > random_windows:
        gen = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(windows.shape[0], generator=gen)[:random_windows].sort().values
        windows = windows[keep]
    if max_windows is not None:
        if max_windows < 1:
            raise DataError("max_windows must be >= 1")
        windows = windows[:max_windows]
    return windows
