"""Token windows: calibration samples and evaluation windows, the way the published code builds them.

**Calibration** (:func:`get_calibration`), one rule per source, each the reference's:

* ``c4`` — SparseGPT's ``get_c4`` (also Wanda's, DSnoT's and GPTQ's): with ``random.seed(seed)``,
  draw a random training document (``random.randint``) until one has more than ``seqlen`` tokens
  (tokenized on its own, special tokens included), then a random window inside it
  (``random.randint(0, len − seqlen − 1)``). Windows never cross documents.
* ``wikitext2`` / ``ptb`` — GPTQ's ``get_wikitext2`` / ``get_ptb`` (also the ALPS authors'): the
  split's rows joined with ``"\\n\\n"``, tokenized once, windows at ``random.randint(0, n − seqlen − 1)``.
* anything else (local files, ``wiki-excerpt``, ``lee``, ``hf:…``) — alpsprune's pool: documents in
  a seeded random order (``torch.Generator``), tokenized without special tokens and joined with the
  ids of ``"\\n\\n"`` until the pool holds ``POOL_FACTOR × nsamples × seqlen`` tokens (a huge source
  is only partly tokenized), window starts drawn uniformly from the pool. Windows may span documents.

**BOS** (``bos="auto"``, the default): when the tokenizer adds a BOS token, every calibration
window starts with it — its first token is replaced by BOS, so the reference's choice of text and
the window length stay — because a model trained to always see BOS first (Gemma, Llama-3, …)
never sees activations of a BOS-less start in use (llm-compressor tokenizes each sample with its
BOS for the same reason). ``bos=False`` gives the reference's windows token for token.

**Evaluation** (:func:`eval_text`, :func:`eval_windows`): the text is the reference's —
``c4``: the first 1100 validation documents joined with ``" "`` (SparseGPT's ``get_c4``),
``wikitext2``: the test rows joined with ``"\\n\\n"``, ``ptb``: the validation sentences joined with
``"\\n\\n"`` (GPTQ's ``get_ptb``), others: the rows joined with ``"\\n\\n"`` — and two protocols cut it:

* ``papers`` — the published stream: tokenized once with the tokenizer's special tokens (so only
  the first window starts with BOS), non-overlapping ``seqlen`` windows, tail dropped; ``c4`` keeps
  the first ``256 × seqlen`` tokens.
* ``bos`` — every window is BOS followed by the next ``seqlen − 1`` tokens of the text (tokenized
  without special tokens); ``c4`` keeps 256 windows.
* ``auto`` — ``bos`` when the tokenizer adds a BOS token itself, otherwise ``papers`` (the two
  would only differ by that BOS).
"""

from __future__ import annotations

import random

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
C4_EVAL_DOCS = 1100  # SparseGPT's get_c4: valdata[:1100]
C4_EVAL_WINDOWS = 256  # ... and the first 256 × seqlen tokens of them
SEPARATOR = "\n\n"
PROTOCOLS = ("auto", "papers", "bos")
DEFAULT_PROTOCOL = "auto"
_BATCH_DOCS = 256
_MAX_DRAWS = 100_000  # document draws per C4 sample before giving up (the reference loops forever)

# which reference rule each named source follows (others: the pool rule, "\n\n" joins)
_CALIB_RULE = {"c4": "documents", "wikitext2": "stream", "ptb": "stream"}
_EVAL_JOIN = {"c4": " "}


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=special, verbose=False)
    return enc["input_ids"]


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts BOS at the start of a text by itself, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = _ids(tokenizer, ["a"], special=True)[0]
    return bos if ids and ids[0] == bos else None


def resolve_protocol(tokenizer, protocol: str = DEFAULT_PROTOCOL) -> str:
    """``papers`` or ``bos``: what ``protocol`` means for this tokenizer (``auto`` → ``bos`` when the
    tokenizer adds a BOS token itself)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown perplexity protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if protocol == "auto":
        return "bos" if tokenizer is not None and bos_id(tokenizer) is not None else "papers"
    if protocol == "bos" and getattr(tokenizer, "bos_token_id", None) is None:
        raise DataError("protocol 'bos' needs a tokenizer with a BOS token; use 'papers' or 'auto'")
    return protocol


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
    """Tokens in the calibration text of ``source`` (documents joined as for the pool rule).

    With ``limit`` the count stops early once it reaches ``limit`` (so ``count >= limit`` is cheap
    to test on a big source)."""
    docs = load_text(source, split, text_field, purpose="calib", loader=loader)
    return int(_token_pool(docs, tokenizer, None, limit).numel())


def _too_small(source: str, split: str | None, have: str, need: str, hint: str = "") -> DataError:
    where = f"calibration source {source!r}" + (f" (split {split})" if split else "")
    return DataError(
        f"{where} has {have}; {need} are needed — lower nsamples/seqlen or choose a larger source{hint}"
    )


def _document_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, source, split):
    """SparseGPT's ``get_c4`` calibration: a random window inside a random document longer than seqlen."""
    rng = random.Random(seed)  # the same stream as the reference's random.seed(seed) + random.randint
    windows = []
    for _ in range(nsamples):
        for _ in range(_MAX_DRAWS):
            ids = _ids(tokenizer, [docs[rng.randint(0, len(docs) - 1)]], special=True)[0]
            if len(ids) > seqlen:
                break
        else:
            have = f"no document longer than {seqlen} tokens in {_MAX_DRAWS:,} draws"
            raise _too_small(source, split, have, "documents longer than the window")
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def _stream_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, source, split):
    """GPTQ's ``get_wikitext2`` / ``get_ptb`` calibration: random windows of the joined split."""
    ids = torch.tensor(_ids(tokenizer, [SEPARATOR.join(docs)], special=True)[0], dtype=torch.long)
    if ids.numel() < seqlen + 1:
        raise _too_small(source, split, f"{ids.numel():,} tokens", f"{seqlen + 1} tokens (one window)")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _pool_windows(docs, tokenizer, nsamples, seqlen, seed, source, split, allow_small: bool):
    gen = torch.Generator().manual_seed(int(seed))
    needed = nsamples * seqlen
    pool = _token_pool(docs, tokenizer, gen, POOL_FACTOR * needed)
    n = pool.numel()
    if n < (seqlen if allow_small else needed):
        need = (
            f"{seqlen} tokens (one window)" if allow_small else f"{nsamples} × {seqlen} = {needed:,} tokens"
        )
        hint = "" if allow_small else " (allow_small=True permits overlapping windows)"
        raise _too_small(source, split, f"{n:,} tokens", need, hint)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([pool[s : s + seqlen] for s in starts.tolist()])


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
    bos: str | bool = "auto",
) -> torch.Tensor:
    """``nsamples`` random ``seqlen``-token windows of ``source`` as a ``(nsamples, seqlen)`` LongTensor.

    The window rule is the reference code's for ``c4``, ``wikitext2`` and ``ptb`` and alpsprune's pool
    for other sources (module docstring). ``split`` defaults to the source's calibration split
    (``train``; C4: train shard 0). ``bos``: ``"auto"`` starts every window with BOS when the
    tokenizer adds one, ``True`` always (error without a BOS token), ``False`` never changes the
    reference's tokens. The pool rule needs ``nsamples × seqlen`` tokens (or, with
    ``allow_small=True``, ``seqlen``). ``exclude`` is the evaluation text to stay clear of: a token
    tensor, or a source name whose evaluation split is checked with :func:`check_disjoint` and then
    token by token (:class:`OverlapError` on overlap).
    """
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if bos not in ("auto", True, False):
        raise DataError(f"bos must be 'auto', True or False, got {bos!r}")
    src = resolve_source(source)
    split = split or src.default_split("calib")
    rule = _CALIB_RULE.get(src.key, "pool") if src.kind == "hub" else "pool"
    # the reference rules index all rows (blank ones too), as the reference code does
    docs = load_text(source, split, text_field, purpose="calib", loader=loader, drop_empty=rule == "pool")
    if rule == "documents":
        windows = _document_windows(docs, tokenizer, nsamples, seqlen, seed, source, split)
    elif rule == "stream":
        windows = _stream_windows(docs, tokenizer, nsamples, seqlen, seed, source, split)
    else:
        windows = _pool_windows(docs, tokenizer, nsamples, seqlen, seed, source, split, allow_small)
    start = bos_id(tokenizer) if bos == "auto" else getattr(tokenizer, "bos_token_id", None) if bos else None
    if bos is True and start is None:
        raise DataError("bos=True needs a tokenizer with a BOS token")
    if start is not None:
        windows[:, 0] = start
    if exclude is not None:
        if isinstance(exclude, str):
            check_disjoint(source, split, exclude, None)
            exclude = eval_tokens(exclude, tokenizer, loader=loader)
        assert_no_window_overlap(windows, exclude)
    return windows


def eval_text(
    source: str, *, split: str | None = None, text_field: str = "text", loader: Loader | None = None
) -> str:
    """The evaluation text of ``source``, joined as the reference code joins it (module docstring).
    ``split`` defaults to the source's evaluation split (WikiText-2: test, PTB: validation, C4:
    validation shard 0, wiki-excerpt / lee: the test articles)."""
    src = resolve_source(source)
    docs = load_text(source, split, text_field, purpose="eval", loader=loader, drop_empty=src.kind != "hub")
    key = src.key if src.kind == "hub" else ""
    if key == "c4":
        docs = docs[:C4_EVAL_DOCS]
    return _EVAL_JOIN.get(key, SEPARATOR).join(docs)


def eval_tokens(
    source: str,
    tokenizer,
    *,
    split: str | None = None,
    text_field: str = "text",
    loader: Loader | None = None,
) -> torch.Tensor:
    """The evaluation text of ``source`` tokenized once with special tokens (the papers' stream, before
    any cut), as a 1-D LongTensor."""
    text = eval_text(source, split=split, text_field=text_field, loader=loader)
    return torch.tensor(_ids(tokenizer, [text], special=True)[0], dtype=torch.long)


def default_eval_windows(source: str | torch.Tensor) -> int | None:
    """How many windows the reference scores for ``source`` (C4: the first 256), else None (all)."""
    if isinstance(source, str) and source.strip() == "c4":
        return C4_EVAL_WINDOWS
    return None


def _cut(tokens: torch.Tensor, width: int, limit: int | None) -> torch.Tensor:
    n = tokens.numel() // width
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise DataError(f"evaluation text has {tokens.numel():,} tokens, fewer than one window of {width}")
    return tokens[: n * width].view(n, width)


def eval_windows(
    data: str | torch.Tensor,
    tokenizer=None,
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    *,
    split: str | None = None,
    text_field: str = "text",
    protocol: str = DEFAULT_PROTOCOL,
    loader: Loader | None = None,
) -> torch.Tensor:
    """Non-overlapping ``(n, seqlen)`` evaluation windows, tail dropped.

    ``data`` is a source name / path (cut with ``protocol``, module docstring), a 1-D token tensor
    (cut as is), or a 2-D tensor of ready windows (used as is). ``max_windows`` then keeps the first
    ``max_windows``.
    """
    if max_windows is not None and max_windows < 1:
        raise DataError("max_windows must be >= 1")
    if isinstance(data, torch.Tensor):
        tokens = data.long()
        if tokens.dim() == 2:
            windows = tokens
        elif tokens.dim() == 1:
            windows = _cut(tokens, seqlen, None)
        else:
            raise DataError("evaluation tokens must be a 1-D sequence or a 2-D tensor of windows")
    else:
        if tokenizer is None:
            raise DataError("a tokenizer is needed to evaluate on a text source")
        how = resolve_protocol(tokenizer, protocol)
        text = eval_text(data, split=split, text_field=text_field, loader=loader)
        limit = default_eval_windows(data)
        if how == "papers":
            windows = _cut(
                torch.tensor(_ids(tokenizer, [text], special=True)[0], dtype=torch.long), seqlen, limit
            )
        else:
            body = _cut(
                torch.tensor(_ids(tokenizer, [text], special=False)[0], dtype=torch.long), seqlen - 1, limit
            )
            windows = torch.cat(
                [torch.full((body.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long), body], 1
            )
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows
