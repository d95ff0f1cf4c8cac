"""Input statistics of one linear layer's calibration inputs, and the factorisations derived from them.

A :class:`Gram` holds ``G = XᵀX`` as a plain float64 sum over all tokens (SPEC §1, no ``1/n``),
the input sum and the token count, and — for DSnoT, whose statistics are per calibration sample —
the sample count and ``Σ_n (Σ_t x_nt)² / L_n`` (sample ``n`` has ``L_n`` tokens). Linears that read the same tensor
(q/k/v, gate/up) share one ``Gram``; every derived quantity (damped ``H``, its scaled
eigendecomposition for ALPS, SparseGPT's inverse Cholesky factor) is computed once per
``Gram`` and cached, so sharing the object shares the work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

GRAM_DTYPE = torch.float64  # running sum of XᵀX over batches (SPEC §1 allows fp32 or fp64)
BATCH_DTYPE = torch.float32  # one batch's XᵀX product


_LAPACK_THREADS: int | None = None  # None: the same threads as everything else (torch's setting)


def set_lapack_threads(threads: int | None) -> None:
    """Threads for CPU factorisations (eigh, Cholesky); ``None``: torch's thread count (the default)."""
    global _LAPACK_THREADS
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    _LAPACK_THREADS = threads


def machine_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads a run should use: the cores this process may run on, less the ones other work keeps busy.

    ``load`` is the 1-minute load average (other processes, measured before this one starts working).
    Multi-threaded LAPACK stalls whenever one of its threads is descheduled (measured on a busy 2-core
    box: eigh of 1536² took 0.57 s on one thread, 25 s on two), so on a busy machine fewer threads are
    faster; on an idle many-core server every core helps (eigh, Cholesky, matmuls).
    """

    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - int(load + 0.5)))


@contextlib.contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Within the context, ``threads`` CPU threads for matmuls and factorisations (``None``: unchanged)."""
    if threads is None:
        yield
        return
    before, before_lapack = torch.get_num_threads(), _LAPACK_THREADS
    torch.set_num_threads(threads)
    set_lapack_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        set_lapack_threads(before_lapack)


@contextlib.contextmanager
def lapack_threads(device: torch.device) -> Iterator[None]:
    """Run CPU LAPACK factorisations on the configured thread count (:func:`set_lapack_threads`).

    By default they use torch's own thread count, which follows the machine (``--threads`` in the CLI,
    else :func:`machine_threads`); matmuls are unaffected.
    """
    if device.type != "cpu" or _LAPACK_THREADS is None or torch.get_num_threads() == _LAPACK_THREADS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(_LAPACK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class ScaledEig:
    """ALPS pre-processing (SPEC §2): ``H = G + λI``, ``e = sqrt(diag H)``, ``Hn = H/(e eᵀ) = Q diag(L) Qᵀ``."""

    lam: float
    e: torch.Tensor  # (in,) float64
    Hn: torch.Tensor  # (in, in) unit diagonal, in the dtype of the decomposition
    Q: torch.Tensor  # (in, in) eigenvectors, in the dtype the decomposition ran in
    L: torch.Tensor  # (in,) eigenvalues (clamped at 0), same dtype as Q


class Gram:
    """Running ``XᵀX``, ``Σx`` and token count for the inputs of one (group of) linear layer(s).

    Optional ``cross`` holds ``X̃ᵀX`` (pruned-model inputs × dense-model inputs) for the
    dense-output target; without it the target is the usual ``X̃ᵀX̃``.
    """

    # how many expensive factorisations were made, process-wide (tests check sharing with it)
    eig_count = 0
    chol_count = 0

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.G = torch.zeros(in_features, in_features, dtype=GRAM_DTYPE, device=device)
        self.sum = torch.zeros(in_features, dtype=GRAM_DTYPE, device=device)
        self.cross: torch.Tensor | None = None
        self.count = 0
        self.samples = 0  # calibration samples (sequences) seen
        self.sample_sq = torch.zeros(in_features, dtype=GRAM_DTYPE, device=device)  # Σ_n (Σ_t x)² / L_n
        self._cache: dict = {}

    @classmethod
    def from_matrix(
        cls, G: torch.Tensor, mean: torch.Tensor | None = None, count: int = 1, samples: int = 1
    ) -> Gram:
        """Wrap an existing ``G`` (e.g. for :func:`alpsprune.prune_layer` called with a plain tensor).

        ``count`` tokens in ``samples`` equal-length samples; the per-sample means are unknown, so
        they are taken equal to ``mean`` (DSnoT's variance is then the plain per-token variance)."""
        gram = cls(G.shape[0], device=G.device)
        gram.G = G.to(GRAM_DTYPE)
        gram.count = count
        gram.samples = samples
        if mean is not None:
            gram.sum = mean.to(device=G.device, dtype=GRAM_DTYPE) * count
            gram.sample_sq = gram.sum**2 / max(count, 1)
        return gram

    def add_batch(self, x: torch.Tensor, dense_x: torch.Tensor | None = None) -> None:
        """Accumulate inputs ``x`` of shape ``(samples, tokens, in)`` (leading dims are samples) or
        ``(tokens, in)`` (one sample, as the DSnoT code treats a 2-D input); ``dense_x`` (same shape)
        fills ``cross``."""
        per_sample = x.reshape(-1, x.shape[-2] if x.dim() >= 3 else x.shape[0], self.in_features)
        sample_sums = per_sample.to(self.G.device).sum(1, dtype=GRAM_DTYPE)  # (samples, in)
        self.sample_sq += (sample_sums**2).sum(0) / per_sample.shape[1]
        self.samples += per_sample.shape[0]
        # the batch product in float32 (several times faster than float64 on CPUs), the running
        # sum over batches in float64 so that many batches do not lose precision
        # (the in-place add widens each float32 entry exactly as `.to(float64)` would, without an in×in
        # float64 temporary: the batch costs one float32 in×in product)
        x = x.reshape(-1, self.in_features).to(device=self.G.device, dtype=BATCH_DTYPE)
        self.G.add_(x.T @ x)
        self.sum += sample_sums.sum(0)
        self.count += x.shape[0]
        if dense_x is not None:
            dense_x = dense_x.reshape(-1, self.in_features).to(device=self.G.device, dtype=BATCH_DTYPE)
            if self.cross is None:
                self.cross = torch.zeros_like(self.G)
            self.cross.add_(x.T @ dense_x)
        self._cache.clear()

    def merge_(self, other: Gram) -> None:
        """Add another Gram's sums into this one (used by the distributed all-reduce fallback)."""
        self.G += other.G.to(self.G.device)
        self.sum += other.sum.to(self.G.device)
        self.count += other.count
        self.samples += other.samples
        self.sample_sq += other.sample_sq.to(self.G.device)
        if other.cross is not None:
            self.cross = other.cross.clone() if self.cross is None else self.cross + other.cross
        self._cache.clear()

    def to(self, device: torch.device | str) -> Gram:
        """A copy of the sums on another device (factorisation cache not copied)."""
        other = Gram(self.in_features, device=device)
        other.G, other.sum, other.count = self.G.to(device), self.sum.to(device), self.count
        other.samples, other.sample_sq = self.samples, self.sample_sq.to(device)
        other.cross = None if self.cross is None else self.cross.to(device)
        return other

    def without_cross(self) -> Gram:
        """The same sums without the dense-output cross term; shares ``G`` and the factorisation cache."""
        other = Gram(self.in_features, device=self.G.device)
        other.G, other.sum, other.count, other._cache = self.G, self.sum, self.count, self._cache
        other.samples, other.sample_sq = self.samples, self.sample_sq
        return other

    # ---- derived statistics -------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Per-feature variance within a sample, pooled over samples (DSnoT's ``Var[x]``): the
        token-weighted mean of each sample's ``E_t[x²] − E_t[x]²``. With one sample it is the plain
        ``E[x²] − E[x]²``."""
        return ((torch.diagonal(self.G) - self.sample_sq) / max(self.count, 1)).clamp_min(0.0)

    @property
    def sample_sum(self) -> torch.Tensor:
        """Per-feature input summed over the tokens of a sample, averaged over samples (DSnoT's scale:
        its error signal and 0.1 threshold are in these units)."""
        return self.sum / max(self.samples, 1)

    def has_nonfinite(self) -> bool:
        return not bool(torch.isfinite(self.G).all())

    def damping(self, dampening_frac: float) -> float:
        """``λ = dampening_frac · mean(diag G)`` (SPEC §1); a tiny floor keeps an all-zero G solvable."""
        lam = dampening_frac * float(torch.diagonal(self.G).mean())
        return lam if lam > 0 else 1e-8

    def damped(self, dampening_frac: float, dtype: torch.dtype = GRAM_DTYPE) -> tuple[torch.Tensor, float]:
        """``(H, λ)`` with ``H = G + λI`` as a new ``dtype`` tensor (the one in×in buffer a factorisation needs)."""
        lam = self.damping(dampening_frac)
        H = self.G.to(dtype, copy=True)
        H.diagonal().add_(lam)
        return H, lam

    def scaled_eig(self, dampening_frac: float, dtype: torch.dtype = torch.float64) -> ScaledEig:
        """ALPS pre-processing, computed once per (Gram, dampening, dtype) and cached.

        ``Hn`` is computed in float64 a slab of rows at a time and stored in ``dtype``, the precision of
        the eigendecomposition and of ALPS's matmuls (float32 halves its time; ALPS's ADMM consumes
        ``Q, L`` in float32 anyway). The values are exactly those of forming all of ``Hn`` in float64
        and casting it, without keeping any float64 in×in copy of ``G``: memory is ``Hn`` and ``Q`` in
        ``dtype`` (plus LAPACK's workspace while ``eigh`` runs).
        """
        key = ("eig", dampening_frac, dtype)
        if key not in self._cache:
            lam = self.damping(dampening_frac)
            e = torch.sqrt(torch.diagonal(self.G) + lam) + 1e-8
            Hn = torch.empty_like(self.G, dtype=dtype)
            n = self.in_features
            rows = max(1, (1 << 20) // max(n, 1))  # ~8 MB float64 slabs
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                slab = self.G[lo:hi].clone()
                slab[:, lo:hi].diagonal().add_(lam)
                Hn[lo:hi] = slab.div_(e[lo:hi, None]).div_(e[None, :])
            with lapack_threads(Hn.device):
                L, Q = torch.linalg.eigh(Hn)
            Gram.eig_count += 1
            self._cache[key] = ScaledEig(lam=lam, e=e, Hn=Hn, Q=Q, L=L.clamp_min(0.0))
        return self._cache[key]

    def cache(self, key, compute):
        """Generic per-Gram memo for solver-specific factorisations (e.g. SparseGPT's Cholesky)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def free(self) -> None:
        """Drop cached factorisations (they can be several ``in²`` buffers)."""
        self._cache.clear()
