"""Shared helpers of the benchmark scripts: machine rates, synthetic layers, fresh grams, tables.

Imported by ``bench/layers.py`` and ``bench/speed.py`` (run as scripts, so ``bench/`` is on
``sys.path``). Nothing here touches the repository tree except ``bench/results``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from alpsprune.solvers.alps import symmetric_product_flops
from alpsprune.stats import Gram

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

METHODS = ("alps", "sparsegpt", "wanda", "magnitude", "dsnot")
PATTERNS = ("0.5", "0.6", "0.7", "0.8", "0.9", "2:4")

# FLOP model (stated in every output): dense symmetric eigendecomposition (tridiagonal reduction +
# QR/divide-and-conquer + back-transformation with eigenvectors) ≈ 9·n³ flops.
EIGH_FLOPS_CONSTANT = 9.0


def pattern_kwargs(pattern: str) -> dict[str, object]:
    """``"0.7"`` → ``{"sparsity": 0.7}``; ``"2:4"`` → ``{"mask_structure": "2:4"}``."""
    if ":" in pattern:
        return {"mask_structure": pattern}
    return {"sparsity": float(pattern)}


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_size(text: str) -> tuple[int, int]:
    """``"1024"`` → (1024, 1024); ``"11008x4096"`` → (11008, 4096) as (out, in)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise ValueError(f"bad size {text!r}; use N or OUTxIN")


def size_label(out_f: int, in_f: int) -> str:
    return f"{out_f}x{in_f}"


# ---- machine rates --------------------------------------------------------------------------------


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Measured flop/s of an ``n×n @ n×n`` matmul (2·n³ flops), best of ``repeats``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    b = torch.randn(n, n, generator=gen, dtype=dtype)
    return 2.0 * n**3 / _best_seconds(lambda: a @ b, repeats)


def eigh_rate(n: int = 768, repeats: int = 3, threads: int | None = None) -> float:
    """Effective flop/s of a float64 ``eigh`` of size ``n``, counting ``EIGH_FLOPS_CONSTANT·n³``.

    ``threads`` temporarily overrides ``torch.set_num_threads`` (multi-threaded LAPACK ``eigh`` can be
    many times slower than single-threaded on an oversubscribed CPU, so both are measured).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = a @ a.T / n + torch.eye(n, dtype=torch.float64)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return EIGH_FLOPS_CONSTANT * n**3 / _best_seconds(lambda: torch.linalg.eigh(a), repeats)
    finally:
        torch.set_num_threads(before)


def machine_rates(quick: bool = False) -> dict[str, float]:
    """fp32/fp64 matmul rates and the effective fp64 eigh rate, in flop/s."""
    n = 1536 if quick else 2048
    return {
        "matmul_fp32_flops": matmul_rate(torch.float32, n),
        "matmul_fp64_flops": matmul_rate(torch.float64, n),
        "eigh_fp64_flops": eigh_rate(512 if quick else 768),
        "eigh_fp64_flops_1thread": eigh_rate(512 if quick else 768, threads=1),
        "matmul_size": n,
    }


def machine_info() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


# ---- ALPS cost model --------------------------------------------------------------------------------


def alps_flops(
    out_f: int,
    in_f: int,
    iterations: int,
    w_update: str,
    pcg_steps: int,
    rho_values: int,
) -> dict[str, float]:
    """FLOPs of each ALPS phase for an ``(out, in)`` layer.

    - ``eig``: ``EIGH_FLOPS_CONSTANT·in³`` (``eigh`` of the scaled ``Hn``, in ALPS's ``precision``).
    - ``setup``: ``C = B0·Hn``, one ``2·out·in²`` matmul.
    - ``admm``: per iteration ``2·(2·out·in²)`` with ``w_update="eig"`` (two products with ``Q``), or
      ``2·out·in²`` with ``"inverse"`` plus, per distinct ρ, re-forming ``Q diag Qᵀ`` as a blocked
      symmetric product (``2·in³·(b+1)/(2b)``, see ``symmetric_product_flops``).
    - ``pcg``: ``(pcg_steps + 1)·2·out·in²`` (initial residual + one ``P·Hn`` per step).
    Top-k selection and element-wise work are memory-bound and not counted.
    """
    mm = 2.0 * out_f * in_f * in_f
    admm = (
        iterations * 2 * mm
        if w_update == "eig"
        else iterations * mm + rho_values * symmetric_product_flops(in_f)
    )
    return {
        "eig": EIGH_FLOPS_CONSTANT * in_f**3,
        "setup": mm,
        "admm": admm,
        "pcg": (pcg_steps + 1) * mm if pcg_steps > 0 else 0.0,
    }


def estimate_alps_seconds(
    out_f: int, in_f: int, rates: dict[str, float], iterations: int = 60, plain: bool = False
) -> float:
    """Rough CPU time of one ALPS call (``iterations`` ADMM steps), used to skip sizes up front
    (eigendecomposition at the better of the threaded / single-threaded ``eigh`` rate).

    ``plain`` = float64 and ``w_update="eig"`` (the unoptimised reference path).
    """
    mode = "eig" if plain else ("inverse" if in_f < 3 * out_f else "eig")
    fl = alps_flops(out_f, in_f, iterations, mode, 10, iterations // 3 + 1)
    rate = rates["matmul_fp64_flops"] if plain else rates["matmul_fp32_flops"]
    eig_rate = max(rates["eigh_fp64_flops"], rates.get("eigh_fp64_flops_1thread", 0.0))
    return fl["eig"] / eig_rate + (fl["setup"] + fl["admm"] + fl["pcg"]) / rate


def replay_rho_values(support_changes: Sequence[int], k: int, rho0: float = 0.1) -> int:
    """Number of distinct ρ values ALPS used, replayed from its support-change log (SPEC §2 schedule)."""
    rho, increased, distinct = rho0, False, 1
    for s in support_changes:
        old = rho
        if s > 0.1 * k:
            rho, increased = rho * 1.3, True
        elif s > 0.005 * k:
            rho, increased = rho * 1.2, True
        elif s >= 1:
            rho = rho * 1.1 if increased else rho / 5
        elif increased:
            break
        else:
            rho /= 5
        rho = min(rho, 1e6)
        distinct += rho != old
    return distinct


# ---- synthetic layers -------------------------------------------------------------------------------


def synthetic_layer(
    out_f: int, in_f: int, seed: int = 0, factors: int = 256, tokens: int = 65536, noise: float = 0.3
) -> tuple[torch.Tensor, Gram]:
    """A random ``(out, in)`` weight and the gram of correlated inputs ``X = (Z A + σ N) diag(s)``.

    ``Z`` is ``tokens × r`` standard normal with ``r = min(factors, in)`` factors whose strengths decay
    (``A``'s rows scaled by ``1/sqrt(1+i/8)``), ``N`` isotropic noise of level ``σ``, ``s`` log-normal
    per-feature scales (some features 10× louder, like LLM activation outliers). The gram is the exact
    expectation ``tokens · diag(s) (AᵀA + σ²I) diag(s)`` plus the finite-sample fluctuation of ``ZᵀZ``
    (computed in ``r×r``, so no ``tokens × in`` matrix is formed). The weight has a small fraction of
    larger entries, as LLM weights do.
    """
    gen = torch.Generator().manual_seed(seed)
    r = min(factors, in_f)
    A = torch.randn(r, in_f, generator=gen, dtype=torch.float64) / math.sqrt(r)
    A *= (1.0 / torch.sqrt(1.0 + torch.arange(r, dtype=torch.float64) / 8.0))[:, None] * 3.0
    Z = torch.randn(min(tokens, 8 * r), r, generator=gen, dtype=torch.float64)
    ZtZ = Z.T @ Z * (tokens / Z.shape[0])  # sampled factor covariance, scaled to `tokens`
    s = torch.exp(0.5 * torch.randn(in_f, generator=gen, dtype=torch.float64))
    s[torch.randperm(in_f, generator=gen)[: max(1, in_f // 100)]] *= 10.0
    G = A.T @ ZtZ @ A
    G.diagonal().add_(noise**2 * tokens)
    G = G * s[:, None] * s[None, :]
    mean = 0.05 * s * torch.randn(in_f, generator=gen, dtype=torch.float64)
    W = torch.randn(out_f, in_f, generator=gen) * 0.02
    W += (torch.rand(out_f, in_f, generator=gen) < 0.005) * torch.randn(out_f, in_f, generator=gen) * 0.1
    return W, Gram.from_matrix(G, mean=mean, count=tokens)


def fresh_gram(gram: Gram) -> Gram:
    """A new :class:`Gram` with the same sums and no cached factorisation (so a timed solver pays for its
    own eigendecomposition / Cholesky, as it would for a layer whose input no other layer shares)."""
    other = Gram.from_matrix(gram.G, mean=gram.mean, count=max(gram.count, 1), samples=max(gram.samples, 1))
    other.sample_sq = gram.sample_sq.clone()
    if gram.cross is not None:
        other.cross = gram.cross.clone()
    return other


# ---- reporting ----------------------------------------------------------------------------------


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (floats formatted by the caller)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_sci(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3e}"


def fmt_num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def jsonable_info(info: dict) -> dict:
    """A solver's ``info`` without bulky per-iteration lists, with tensors as numbers."""
    out = {}
    for key, value in info.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        out[key] = value
    return out
