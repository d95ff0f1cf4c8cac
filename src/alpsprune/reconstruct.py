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
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .models import run_block
from .streaming import ActivationStream


@dataclass(frozen=True)
class Reconstruction:
    """Settings of the per-block reconstruction.

    :param epochs: passes over the calibration batches per block.
    :param lr: Adam learning rate (cosine-decayed to zero over the block's steps).
    :param seed: order of the batches (with the block index), so reruns and resumes are identical.
    """

    epochs: int = 2
    lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"reconstruction epochs must be ≥ 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"reconstruction lr must be a positive number, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


def _float32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(_float32(v) for v in value)
    return value


def block_mse(
    block: nn.Module,
    inputs: ActivationStream,
    targets: ActivationStream,
    kwargs_of: Callable[[int], dict],
) -> float:
    """Mean squared error of the block's outputs against ``targets`` over all batches (float64 sum)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(len(inputs)):
            out = run_block(block, inputs.fetch(b), kwargs_of(b))
            diff = out.double() - targets.fetch(b).to(out.device).double()
            total += float(diff.pow(2).sum())
            count += diff.numel()
    return total / max(count, 1)


def reconstruct_block(
    block: nn.Module,
    masks: dict[nn.Parameter, torch.Tensor],
    inputs: ActivationStream,
    targets: ActivationStream,
    kwargs_of: Callable[[int], dict],
    settings: Reconstruction,
    block_index: int = 0,
) -> dict[str, float | bool]:
    """Train ``block``'s floating-point parameters (in place) so that ``block(inputs) ≈ targets``.

    ``masks`` maps each pruned weight to its keep-mask: those entries are zeroed after every step,
    so the sparsity pattern is exactly the solvers'. The optimisation runs in float32 whatever the
    model's dtype (bf16 steps of ~1e-4 would mostly round away) and the result is cast back.
    Returns the block-output MSE before and after.
    """
    params = [p for p in block.parameters() if p.is_floating_point()]
    dtypes = [p.dtype for p in params]
    before = block_mse(block, inputs, targets, kwargs_of)
    backup = [p.data.clone() for p in params]  # a step that makes the block worse is undone
    masters = [p.data.float() for p in params]
    low_precision = [p.dtype != torch.float32 for p in params]
    for p, master in zip(params, masters):
        p.data = master
    float_masks = {id(p): masks[p] for p in params if p in masks}
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + block_index)
    steps = settings.epochs * len(inputs)
    trainable = params
    grad_state = [p.requires_grad for p in trainable]
    optimizer = torch.optim.Adam(trainable, lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    try:
        for p in trainable:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(settings.epochs):
                for b in torch.randperm(len(inputs), generator=generator).tolist():
                    x = inputs.fetch(b).float()
                    target = targets.fetch(b).to(x.device).float()
                    kwargs = {k: _float32(v) for k, v in kwargs_of(b).items()}
                    out = run_block(block, x, kwargs)
                    loss = torch.nn.functional.mse_loss(out, target)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():
                        for p in trainable:
                            mask = float_masks.get(id(p))
                            if mask is not None:
                                p.mul_(mask)
    finally:
        for p, state in zip(trainable, grad_state):
            p.requires_grad_(state)
            p.grad = None
        for p, dtype, low in zip(params, dtypes, low_precision):
            if low:
                p.data = p.data.to(dtype)
    after = block_mse(block, inputs, targets, kwargs_of)
    if not after < before:  # (also NaN) keep the solvers' weights
        for p, saved in zip(params, backup):
            p.data = saved
        return {"mse_before": before, "mse_after": before, "kept": False}
    return {"mse_before": before, "mse_after": after, "kept": True}
