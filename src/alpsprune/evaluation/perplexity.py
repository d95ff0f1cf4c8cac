"""Perplexity with the standard recipe.

The windows come from :func:`alpsprune.data.eval_windows`: the reference code's text, cut by a
protocol — ``papers`` (the published stream: tokenized once, non-overlapping ``seqlen`` windows,
only the first starts with BOS; C4: the first 256 windows of 1100 validation documents) or ``bos``
(BOS + the next ``seqlen − 1`` tokens in every window); ``auto`` (default) is ``bos`` when the
tokenizer adds BOS itself. Each window is scored independently. ``nll`` is the mean negative
log-likelihood over all *predicted* tokens — each window predicts its tokens 2..seqlen, so
``seqlen - 1`` per window — and ``ppl = exp(nll)``. Because every window has the same length this
equals the SparseGPT/ALPS code's
``exp(sum(window_mean_loss * seqlen) / (n * seqlen))`` exactly.

This is *not* lm-evaluation-harness's ``wikitext`` task (document-level word perplexity with rolling
windows): the two numbers differ and must not be compared.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.sources import DEFAULT_SEQLEN
from ..data.windows import DEFAULT_PROTOCOL, eval_windows, resolve_protocol
from ..models.capture import offloaded


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one dataset; ``float(result)`` is the perplexity."""

    ppl: float
    nll: float
    tokens: int  # predicted tokens scored: windows × (seqlen - 1)
    windows: int
    seqlen: int
    seconds: float
    dataset: str = ""
    protocol: str = ""  # papers | bos (how a text source was cut) | tokens (given as a tensor)

    def __float__(self) -> float:
        return self.ppl


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row of ``ids`` (shape ``(b, L)``) → ``(b,)`` float64."""
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logp = logits[:, :-1, :].float()
    target = ids[:, 1:]
    nll = F.cross_entropy(logp.reshape(-1, logp.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).double().sum(dim=1)


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    dataset: str | torch.Tensor = "wikitext2",
    seqlen: int = DEFAULT_SEQLEN,
    max_windows: int | None = None,
    batch_size: int = 1,
    *,
    split: str | None = None,
    text_field: str = "text",
    device: str | torch.device | None = None,
    progress: bool = True,
    offload: bool = False,
    protocol: str = DEFAULT_PROTOCOL,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset``.

    ``dataset``: a source name (``wikitext2`` test, ``ptb`` validation, ``c4`` validation shard 0,
    ``wiki-excerpt`` / ``lee`` test part, ``hf:<name>[:config]``), a local file or folder, a 1-D token
    tensor, or a 2-D tensor of windows. ``max_windows`` scores only the first windows (quick checks).
    The model runs where its weights are unless ``device`` is given (inputs are moved there).
    ``offload=True`` evaluates models larger than the device: weights stay where they are (CPU) and
    one decoder block at a time visits ``device`` (default: CUDA if available) during the forward.
    ``protocol`` (``auto`` | ``papers`` | ``bos``) says how a text source is cut into windows;
    the result records the one used.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    from tqdm.auto import tqdm

    name = dataset if isinstance(dataset, str) else "tokens"
    windows = eval_windows(
        dataset, tokenizer, seqlen, max_windows, split=split, text_field=text_field, protocol=protocol
    )
    how = resolve_protocol(tokenizer, protocol) if isinstance(dataset, str) else "tokens"
    n, width = windows.shape
    dev = torch.device(device) if device is not None else _model_device(model)
    if offload and device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    try:
        with (
            torch.inference_mode(),
            offloaded(model, dev) if offload else contextlib.nullcontext(),
            tqdm(total=n, desc=f"ppl {name}", unit="win", disable=not progress) as bar,
        ):
            for i in range(0, n, batch_size):
                batch = windows[i : i + batch_size].to(dev)
                total += window_nll(model, batch).sum().cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    tokens = n * (width - 1)
    nll = float(total / tokens)
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=tokens,
        windows=n,
        seqlen=width,
        seconds=time.perf_counter() - start,
        dataset=name,
        protocol=how,
    )
