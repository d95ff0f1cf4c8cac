"""The one entry point for layer solvers: validation, dtype/device handling, timing, error.

A solver is a pure function ``solve(W_hat, gram, spec, **options) -> (W, mask, info)``:
``W_hat`` is the dense weight as float32 ``(out, in)`` on the compute device, ``gram`` a
:class:`~alpsprune.stats.Gram`, ``spec`` a :class:`~alpsprune.sparsity.SparsitySpec`. It
returns the pruned float32 weight, the bool mask of kept weights and a dict of facts. No
modules, hooks, prints or files here.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..masks import pattern_ok, relative_error, row_slabs
from ..sparsity import SparsitySpec
from ..stats import Gram, lapack_threads

SolveFn = Callable[..., tuple[torch.Tensor, torch.Tensor, dict]]
SOLVERS: dict[str, SolveFn] = {}
# solvers that use ``gram.cross`` themselves; the others get the dense target through
# :func:`dense_target_weight` (an exact reduction, see there)
NATIVE_DENSE_TARGET: set[str] = set()


def register(name: str, *, dense_target: bool = False) -> Callable[[SolveFn], SolveFn]:
    def wrap(fn: SolveFn) -> SolveFn:
        SOLVERS[name] = fn
        if dense_target:
            NATIVE_DENSE_TARGET.add(name)
        return fn

    return wrap


def dense_target_weight(W_hat: torch.Tensor, gram: Gram, dampening_frac: float) -> torch.Tensor:
    """``W* = Ŵ (XᵀX̃ + λI)(X̃ᵀX̃ + λI)⁻¹``: the dense weight that best maps pruned inputs to dense outputs.

    Per row, ``‖X̃w − Xŵ‖² + λ‖w − ŵ‖² = (w − w*)ᵀ(X̃ᵀX̃ + λI)(w − w*) + const``, so any solver of
    the standard problem (target ``w*``, gram ``X̃ᵀX̃``, same ``λ``) solves the dense-target problem
    exactly. ``gram.cross`` holds ``X̃ᵀX``.
    """
    assert gram.cross is not None

    def factorise() -> tuple[torch.Tensor, float]:  # once per gram: q/k/v share it
        H, lam = gram.damped(dampening_frac)
        with lapack_threads(H.device):
            return torch.linalg.cholesky(H), lam

    factor, lam = gram.cache(("dense_target_cholesky", dampening_frac), factorise)
    cross_T = gram.cross.T.to(factor.dtype)  # a view when both are float64 (the Gram's sums are)
    W_star = torch.empty_like(W_hat)
    # rows are independent: a float64 slab of rows at a time, so the float64 copies of W, the right-hand
    # side and the solution are a few rows × in, not out × in each
    for r0, r1 in row_slabs(*W_hat.shape):
        W = W_hat[r0:r1].to(factor.dtype)
        rhs = W @ cross_T + lam * W  # (rows, in)
        with lapack_threads(factor.device):
            W_star[r0:r1] = torch.cholesky_solve(rhs.T, factor).T
    return W_star


@dataclass
class PruneResult:
    weight: torch.Tensor  # pruned weight, same shape/dtype/device as the input
    mask: torch.Tensor  # bool, True where kept
    error: float  # relative reconstruction error with the undamped gram
    info: dict = field(default_factory=dict)


def solver_options(method: str) -> dict[str, object]:
    """The keyword options of a solver and their defaults."""
    fn = _get_solver(method)
    params = list(inspect.signature(fn).parameters.values())[3:]
    return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}


def _get_solver(method: str) -> SolveFn:
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[method]


def validate_layer(weight: torch.Tensor, gram: torch.Tensor | Gram, name: str = "weight") -> None:
    """Raise ``ValueError`` for inputs no solver can handle."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (out, in) like nn.Linear.weight")
    if not weight.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    G = gram.G if isinstance(gram, Gram) else gram
    if not isinstance(G, torch.Tensor) or G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError("gram must be a square (in, in) tensor or an alpsprune.Gram")
    if G.shape[0] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: {name} is {tuple(weight.shape)} (out, in) but gram is {tuple(G.shape)}; "
            f"the gram must be (in, in) = ({weight.shape[1]}, {weight.shape[1]})"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"gram of {name} contains NaN or Inf (check the calibration activations)")


def prune_layer(
    weight: torch.Tensor,
    gram: torch.Tensor | Gram,
    method: str = "alps",
    sparsity: float | None = None,
    mask_structure: str | None = None,
    **options,
) -> PruneResult:
    """Prune one linear layer.

    :param weight: dense weight ``(out, in)`` as ``nn.Linear.weight``; fp32/fp16/bf16, CPU or CUDA.
    :param gram: ``G = XᵀX`` summed over calibration tokens, ``(in, in)``, or an
        :class:`alpsprune.Gram` (shares factorisations between layers with the same input).
    :param method: ``alps`` | ``sparsegpt`` | ``wanda`` | ``magnitude`` | ``dsnot``.
    :param sparsity: fraction of weights removed, layer-wide (exactly one of this and ``mask_structure``).
    :param mask_structure: ``"N:M"`` — at most N kept (non-zero) in every M consecutive inputs of a row.
    :param options: method options (see each solver's docstring), e.g. ``dampening_frac=0.01``.
    :returns: :class:`PruneResult` with the pruned weight in the input's dtype and device.
    """
    fn = _get_solver(method)
    spec = SparsitySpec.parse(sparsity, mask_structure)
    validate_layer(weight, gram)
    spec.check_shape(*weight.shape)
    allowed = solver_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; valid options: {', '.join(allowed) or 'none'}"
        )
    device = weight.device
    if not isinstance(gram, Gram):
        gram = Gram.from_matrix(gram.to(device))
    W_hat = weight.detach().to(torch.float32)
    start = time.perf_counter()
    if gram.cross is not None and method not in NATIVE_DENSE_TARGET:
        damp = options.get("dampening_frac", allowed.get("dampening_frac", 0.01))  # the solver's λ
        W_hat = dense_target_weight(W_hat, gram, float(damp))
        gram = gram.without_cross()
    W, mask, info = fn(W_hat, gram, spec, **options)
    W = W * mask  # exact zeros off the support, whatever the solver did
    info = {"method": method, **info, "seconds": time.perf_counter() - start}
    if not pattern_ok(mask, spec):  # a solver bug must never reach a saved model
        raise RuntimeError(f"{method} returned a mask that violates {spec.label} (kept {int(mask.sum())})")
    if not bool(torch.isfinite(W).all()):
        raise RuntimeError(f"{method} produced NaN/Inf weights")
    pruned = W.to(dtype=weight.dtype, device=device)
    return PruneResult(
        weight=pruned, mask=mask.to(device), error=relative_error(weight, pruned, gram.G), info=info
    )
