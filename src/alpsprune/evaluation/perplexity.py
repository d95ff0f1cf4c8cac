"""Perplexity with the standard recipe.

The evaluation text is joined with ``"\\n\\n"``, tokenized once, cut into non-overlapping ``seqlen``
windows (tail dropped; C4: 256 seeded random windows of validation shard 0), and each window is
scored independently. ``nll`` is the mean negative log-likelihood over all *predicted* tokens — each
window predicts its tokens 2..seqlen, so ``seqlen - 1`` per window — and ``ppl = exp(nll)``. Because
every window has the same length this equals the SparseGPT/ALPS code's
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

from ..data.sources import DEFAULT_SEED, DEFAULT_SEQLEN
from ..data.windows import eval_windows
from ..streaming import Placement, fits_on_device, stream_logits, visiting


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

    def __float__(self) -> float:
        return self.ppl


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _n_blocks(model: torch.nn.Module) -> int:
    from ..models.discovery import find_decoder_blocks

    return len(find_decoder_blocks(model)[1])


def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row of ``ids`` (shape ``(b, L)``) → ``(b,)`` float64."""
    return output_nll(model(input_ids=ids, use_cache=False), ids)


def output_nll(out, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each row of ``ids`` from the model's output for them → ``(b,)`` float64."""
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
    seed: int = DEFAULT_SEED,
    offload: bool | str = False,
    offload_activations: bool | str = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset``.

    ``dataset``: a source name (``wikitext2`` test, ``ptb`` validation, ``c4`` validation shard 0,
    ``wiki-excerpt`` / ``lee`` test part, ``hf:<name>[:config]``), a local file or folder, a 1-D token
    tensor, or a 2-D tensor of windows. ``max_windows`` scores only the first windows (quick checks).
    The model runs where its weights are unless ``device`` is given.

    ``offload`` decides how the weights meet the device:

    * ``False``: the model is resident on ``device`` for the evaluation (moved there once if its
      weights are elsewhere, and back afterwards);
    * ``True``: block streaming (:func:`alpsprune.streaming.stream_logits`): the weights stay where
      they are and each decoder block visits ``device`` (default: CUDA if available) *once* for all
      windows; the hidden states of all windows wait between blocks at ``offload_activations``
      (``True``/``"host"``: CPU memory, ``False``/``"device"``, ``"disk"``). For models larger than
      the device;
    * ``"auto"``: resident when the weights fit in the device's free memory, else streaming.

    Every mode gives the same perplexity (the same operations on the same inputs).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    from tqdm.auto import tqdm

    name = dataset if isinstance(dataset, str) else "tokens"
    windows = eval_windows(
        dataset, tokenizer, seqlen, max_windows, split=split, text_field=text_field, seed=seed
    )
    n, width = windows.shape
    dev = torch.device(device) if device is not None else _model_device(model)
    if offload is True and device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if offload not in (True, False, "auto"):
        raise ValueError(f"offload must be True, False or 'auto', got {offload!r}")
    streamed = offload is True or (offload == "auto" and not fits_on_device(model, dev))
    home = _model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    try:
        if streamed:
            placement = Placement.make(dev, offload_activations)
            n_blocks = _n_blocks(model)
            with (
                torch.inference_mode(),
                tqdm(total=n_blocks, desc=f"ppl {name}", unit="block", disable=not progress) as bar,
            ):
                for ids, out in stream_logits(
                    model, windows, placement, batch_size, progress=lambda k: bar.update(1)
                ):
                    total += output_nll(out, ids).sum().cpu()
        else:
            with (
                # resident: every weight moves once; the model's own tensors are put back afterwards
                visiting(model, dev, writes=False) if home != dev else contextlib.nullcontext(),
                torch.inference_mode(),
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
    )
