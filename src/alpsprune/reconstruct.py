"""Local reconstruction: after a block's layers are pruned, train its remaining weights to reproduce
the dense block's outputs (issue 18).

The layer solvers fit each linear on its own inputs; errors of several pruned layers still compound
inside a block (through the attention softmax, the MLP's gate) and from block to block. Local
reconstruction (Roux, Zimmer, Wagner, Pokutta, arXiv 2510.14444) adapts one *nonlinear* part of the
model at a time on the calibration set, matching the dense model's activations: it recovers most of
what retraining would, at a small fraction of its cost, and its quality hardly depends on how big the
reconstructed part is as long as it contains a nonlinearity (a matrix alone does worst). Here the
part is the whole decoder block: its input is the pruned stream (what the block will really see), its
target the dense stream after the dense block; the masks are fixed (every pruned weight stays exactly
zero), the kept weights, biases and norms move, with Adam.

Pure data flow over an :class:`~alpsprune.streaming.ActivationStream`; the block is already on the
compute device (inside :func:`alpsprune.streaming.visiting`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .models import run_block
from .parallel import Parallel, single_process
from .streaming import ActivationStream

LOSSES = ("mse", "token")


def output_error(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Elementwise error whose mean is the training loss: ``out - target``, for ``"token"`` scaled
    by each token's dense RMS over the hidden dimension (floored so a zero token cannot divide by 0)."""
    diff = out - target
    if loss == "token":
        rms = target.pow(2).mean(dim=-1, keepdim=True).sqrt()
        diff = diff / rms.clamp_min(1e-6)
    return diff


# Settings a Reconstruction leaves unset take these (alpsprune.pipeline.RECOMMENDED may set its own
# per pattern). All chosen on validation text (bench/reconstruct_lr.py: the ``lee`` stories' train part,
# never the held-out windows), ALPS at 70% on SmolLM2-135M: lr 1e-4 / 3e-4 / 1e-3 / 3e-3 / 1e-2 gave
# 175.8 / 172.1 / 153.0 / 139.3 / 157.7 (2 epochs, mse); loss mse / token 139.3 / 132.6 (2 epochs) and
# 121.1 / 118.2 (4 epochs); token at 6 epochs 113.0, but at 3.6× the time of the pipeline without
# reconstruction (4 epochs: 2.8×; the budget is 3×).
DEFAULTS = {"epochs": 4, "lr": 3e-3, "loss": "token"}


@dataclass(frozen=True)
class Reconstruction:
    """Settings of the per-block reconstruction; a setting left ``None`` is the recipe's
    (:meth:`resolved`), so ``Reconstruction(lr=1e-3)`` means "the recipe, at lr 1e-3".

    :param epochs: passes over the calibration batches per block.
    :param lr: Adam learning rate (cosine-decayed to zero over the block's steps).
    :param loss: ``"mse"`` — plain mean squared error of the block outputs; ``"token"`` — each
        token's error divided by that token's dense output RMS. The next block and the final norm
        see every token through an RMSNorm, i.e. relative to its RMS; a few tokens carry "massive
        activations" hundreds of times the others' and dominate plain MSE (at 70% the block MSE
        falls only 1–4% while perplexity falls 25%), so the relative error is what matters downstream.
    :param seed: order of the batches (with the block index), so reruns and resumes are identical.
    """

    epochs: int | None = None
    lr: float | None = None
    loss: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"reconstruction epochs must be ≥ 1, got {self.epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"reconstruction lr must be a positive number, got {self.lr}")
        if self.loss is not None and self.loss not in LOSSES:
            raise ValueError(f"reconstruction loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def resolved(self, recipe: dict | None = None) -> Reconstruction:
        """Every unset setting filled: from ``recipe`` (a pattern's settings), else :data:`DEFAULTS`."""
        fill = {**DEFAULTS, **(recipe or {})}
        return replace(self, **{k: fill[k] for k in DEFAULTS if getattr(self, k) is None})

    def to_dict(self) -> dict:
        return asdict(self)


def _float32(value):
    """Floating tensors (also inside tuples and dicts, e.g. rotary cos/sin) as float32."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


def _batch_losses(block, inputs, targets, kwargs_of, loss: str) -> torch.Tensor:
    """Per batch of this rank: (sum of squared errors, element count), float64, shape ``(batches, 2)``."""
    rows = []
    with torch.no_grad():
        for b in range(len(inputs)):
            out = run_block(block, inputs.fetch(b), kwargs_of(b))
            diff = output_error(out.double(), targets.fetch(b).to(out.device).double(), loss)
            rows.append(torch.tensor([float(diff.pow(2).sum()), float(diff.numel())], dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros((0, 2), dtype=torch.float64)


def block_mse(
    block: nn.Module,
    inputs: ActivationStream,
    targets: ActivationStream,
    kwargs_of: Callable[[int], dict],
    parallel: Parallel | None = None,
    loss: str = "mse",
) -> float:
    """Mean squared error (``loss``: see :class:`Reconstruction`) of the block's outputs against
    ``targets`` over all batches of all ranks, summed in the single process's batch order (so every
    rank, and one process, get the same number)."""
    rows = (parallel or single_process()).all_gather_rows(
        _batch_losses(block, inputs, targets, kwargs_of, loss)
    )
    total, count = 0.0, 0.0
    for loss, n in rows.tolist():
        total += loss
        count += n
    return total / max(count, 1.0)


def reconstruct_block(
    block: nn.Module,
    masks: dict[nn.Parameter, torch.Tensor],
    inputs: ActivationStream,
    targets: ActivationStream,
    kwargs_of: Callable[[int], dict],
    settings: Reconstruction,
    block_index: int = 0,
    parallel: Parallel | None = None,
) -> dict[str, float | bool]:
    """Train ``block``'s floating-point parameters (in place) so that ``block(inputs) ≈ targets``.

    ``masks`` maps each pruned weight to its keep-mask: their gradients are masked (Adam's moments
    of a pruned entry stay zero) and the entries zeroed after every step, so the sparsity pattern is
    exactly the solvers'. Each step is one calibration batch, in a seeded order over all batches.
    Under torchrun the rank holding the step's batch computes its gradient and the others add
    zeros, so every rank, and a single process, take the very same steps. The optimisation runs in
    float32 whatever the model's dtype (bf16 steps of ~1e-4 would mostly round away) and the result
    is cast back. A block that ends worse than it started (or non-finite) gets its weights back.
    Returns the block-output MSE before and after.
    """
    parallel = parallel or single_process()
    settings = settings.resolved()
    params = [p for p in block.parameters() if p.is_floating_point()]
    dtypes = [p.dtype for p in params]
    before = block_mse(block, inputs, targets, kwargs_of, parallel, settings.loss)
    # train on private float32 copies: the originals (perhaps memory-mapped from the model's files)
    # are never written, and are what a block that did not improve gets back
    backup = [p.data for p in params]
    for p in params:
        p.data = p.data.to(torch.float32, copy=True)
    grad_masks = {id(p): masks[p].to(p.device, torch.float32) for p in params if p in masks}
    # global batch g lives on the rank whose share of the batches holds it (shares are contiguous)
    counts = [int(c) for c in parallel.all_gather_rows(torch.tensor([[len(inputs)]])).flatten()]
    offset = sum(counts[: parallel.rank])
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + block_index)
    steps = settings.epochs * sum(counts)
    requires_grad = [p.requires_grad for p in params]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(settings.epochs):
            for g in torch.randperm(sum(counts), generator=generator).tolist():
                optimizer.zero_grad(set_to_none=True)
                if offset <= g < offset + len(inputs):
                    b = g - offset
                    with torch.enable_grad():
                        out = run_block(block, inputs.fetch(b).float(), _float32(kwargs_of(b)))
                        target = targets.fetch(b).to(out.device).float()
                        output_error(out, target, settings.loss).pow(2).mean().backward()
                grads = []
                for p in params:
                    if p.grad is None:  # not this rank's batch (or unused): adds nothing
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
                parallel.all_reduce_sum_(grads)
                for p in params:
                    mask = grad_masks.get(id(p))
                    if mask is not None:
                        p.grad.mul_(mask)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    for p in params:
                        mask = grad_masks.get(id(p))
                        if mask is not None:
                            p.mul_(mask)
    finally:
        for p, state, dtype in zip(params, requires_grad, dtypes):
            p.requires_grad_(state)
            p.grad = None
            p.data = p.data.to(dtype)
    after = block_mse(block, inputs, targets, kwargs_of, parallel, settings.loss)
    if not after < before:  # (also NaN) keep the solvers' weights
        for p, saved in zip(params, backup):
            p.data = saved
        return {"mse_before": before, "mse_after": before, "kept": False}
    return {"mse_before": before, "mse_after": after, "kept": True}
