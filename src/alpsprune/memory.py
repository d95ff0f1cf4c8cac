"""Memory plan: peak device and host memory of a pruning run per phase, and a time estimate, before any
weight is loaded.

Pure arithmetic on a model's shape (from a ``transformers`` config, a config dict or JSON file, or a
built-in name such as ``llama-2-7b``), the method, the recipe (faithful or the default dense-target +
sub-layer pipeline), the calibration size, dtype, world size and where activations live. Nothing here
allocates tensors; :func:`plan_run` is cheap enough for ``--dry-run`` and for choosing the placement
of activations in a real run (:func:`choose_placement`).

What each phase holds (``a`` bytes per element of the model dtype, ``T`` calibration tokens of this
rank, ``t`` tokens of one batch, ``h`` hidden, ``i`` intermediate width):

- **capture** — embeddings (and everything outside the blocks) on the device, the hidden stream
  ``T·h·a`` where activations live.
- **statistics** — one block on the device (with the dense target also the original weights of the
  layers already pruned, for the dense stream's later passes); the activation streams (``T·h·a`` each: the pruned stream,
  plus the dense stream for the dense-output target) where activations live; the grams of the
  stage (faithful: every distinct input of the block at once; sub-layer: one input at a time, plus
  its cross term for the dense target) as float64 ``in²`` sums; one batch's forward temporaries and
  its float32 ``XᵀX`` product.
- **solve** — the stage's grams plus the largest layer's solver workspace (:data:`SOLVER_WORKSPACE`:
  the larger of its factorisation's and its iterations' ``in²`` and ``out·in`` buffers, plus float64
  row slabs of the error report, counted from the solvers' code and checked by measurement,
  ``bench/memory.py``).
- **propagate** — the streams and one batch's forward temporaries.
- **evaluate** — one block at a time on the device (plus embeddings and LM head), one window's
  activations and its float32 logits (a model that fits the device may instead stay resident).

Host memory always holds the model's weights (they stay on the host; one block at a time visits the
device), the process itself (:data:`HOST_BASELINE`) and, with activations offloaded, the streams. On a
CPU-only run device and host are the same memory: :attr:`MemoryPlan.peak_total` is what ``ru_maxrss``
should show.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3
MiB = 1024**2

# Resident memory of a Python process that has imported torch, transformers and alpsprune and run a
# forward (measured here: 407 MiB; torch 2.13, transformers 5); the CUDA context on a GPU.
HOST_BASELINE = 420 * MiB
CUDA_CONTEXT = 600 * MiB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Built-in configs (public config.json values; no download needed for --dry-run).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "llama-3-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "llama-3-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}

# MLPs without a gate (fc1 -> act -> fc2); everything else is treated as gate/up/down.
_PLAIN_MLP = {"opt", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "falcon", "bloom", "phi", "codegen"}


# Per-layer solver workspace beyond the gram, at the solver's two moments, whichever is larger: its
# factorisation and its iterations, as ``(in² buffers in the solver precision, out·in float32
# buffers)`` each; plus the in² float64 buffers of the dense-target reduction for solvers without a
# native one (its damped H and cached Cholesky factor, held through the solve). Counted from the code
# and checked against measured peaks (bench/memory.py). ALPS (one moment): Hn, Q and LAPACK's eigh
# workspace (≈ 2 in²) at the factorisation, later Hn, Q, (Hn+ρI)⁻¹ and the symmetric product's
# operand; out·in its iterations (≈ 10: B0, C, B, D, V, Z, masks, the selection's copy) plus Ŵ and W.
# SparseGPT: H, its factor and torch's copy (3 in², measured 12.9 bytes·in² in tests/test_memory.py)
# next to Ŵ while factorising, then U and the column sweep's out·in buffers (≈ 5) plus Ŵ and W: the two
# are never live together (counting them at once over-predicted the h4096 peak by 10%). Wanda: scores,
# the row sort's values and int64 indices, mask and product (≈ 5) plus Ŵ and W. The float64 passes
# over a weight (the error report `masks.relative_error`, the dense-target reduction) run a slab of
# rows at a time: :data:`ROW_SLAB_BYTES` each, counted by :func:`row_slab_bytes`.
@dataclass(frozen=True)
class Workspace:
    factor: tuple[float, float]  # (in², out·in) buffers while factorising
    iterate: tuple[float, float]  # (in², out·in) buffers while iterating
    dense_reduction: float  # in² float64 buffers of the dense-target reduction (non-native solvers)

    def bytes(self, in_features: int, out_features: int, precision_bytes: int, dense_target: bool) -> int:
        sq, oi = in_features**2, out_features * in_features
        moments = (a * sq * precision_bytes + b * oi * 4 for a, b in (self.factor, self.iterate))
        reduction = self.dense_reduction * sq * 8 if dense_target else 0
        return int(max(moments) + reduction)


SOLVER_WORKSPACE: dict[str, Workspace] = {
    "alps": Workspace((4.0, 12.0), (4.0, 12.0), 0.0),
    "sparsegpt": Workspace((3.0, 1.0), (1.0, 7.0), 2.0),
    "wanda": Workspace((0.0, 7.0), (0.0, 7.0), 2.0),
    "magnitude": Workspace((0.0, 7.0), (0.0, 7.0), 2.0),
    "dsnot": Workspace((0.0, 7.0), (0.0, 7.0), 2.0),
}
ROW_SLAB_BYTES = 8 << 22  # masks.ROW_SLAB_ELEMENTS float64 elements
ROW_SLABS_LIVE = 3  # a slab of Ŵ, of Ŵ − W (or the right-hand side) and of their product with G


def row_slab_bytes(out_features: int, in_features: int) -> int:
    """Float64 row slabs live at once in a pass over an ``out × in`` weight (never more than all of it)."""
    return ROW_SLABS_LIVE * min(ROW_SLAB_BYTES, out_features * in_features * 8)


NATIVE_DENSE_TARGET = {"alps"}  # the others reduce the dense target with a float64 Cholesky

# Forward temporaries of one decoder block per token, in units of hidden / intermediate elements
# of the model dtype (residual, norm, q/k/v, attention output; gate, up, act, product), plus the
# float32 copy a statistics hook makes of one layer input.
FORWARD_HIDDEN, FORWARD_INTERMEDIATE = 6.0, 3.0

# Device rates for the time estimate: (float32 matmul, bf16/fp16 matmul) flop/s at peak, dense.
DEVICE_FLOPS: dict[str, tuple[float, float]] = {
    "v100": (15.7e12, 125e12),
    "a100": (19.5e12, 312e12),
    "l40s": (91.6e12, 362e12),
    "rtx4090": (82.6e12, 165e12),
    "h100": (67e12, 989e12),
    "h200": (67e12, 989e12),
}
MATMUL_EFFICIENCY = 0.6  # share of peak large matmuls reach
FACTOR_EFFICIENCY = 0.05  # eigh / Cholesky on a GPU: far from matmul peak (many small steps)
CPU_FACTOR_EFFICIENCY = 0.4  # eigh on a CPU relative to its matmul rate (measured 56 vs 150 GF/s)
SPARSEGPT_COLUMN_SECONDS_GPU = 60e-6  # SparseGPT's column sweep: a few small kernels per column
ALPS_ITERATIONS = 60  # typical ADMM iterations per layer (bench/results/speed.json)


@dataclass(frozen=True)
class Linear:
    name: str
    out_features: int
    in_features: int
    group: str  # linears that read the same input share a group (one gram)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True
    tied_embeddings: bool = False
    dtype: str = "float32"  # the dtype the config declares (what ``--dtype auto`` loads)

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelShape:
        """From a ``transformers`` config object or a plain dict of config.json fields."""
        get = (
            (lambda k: config.get(k)) if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
        )

        def first(*keys: str, default: Any = None) -> Any:
            for key in keys:
                value = get(key)
                if value is not None:
                    return value
            return default

        text = first("text_config")  # multimodal wrappers: the language model's config
        if text is not None and first("hidden_size", "n_embd", "d_model") is None:
            return cls.from_config(text, name)
        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head")
        if hidden is None or layers is None or heads is None:
            from .errors import ModelError

            raise ModelError(
                "the config has no hidden_size/num_hidden_layers/num_attention_heads; "
                "the memory plan needs a decoder-only transformer config"
            )
        model_type = str(first("model_type", default="")).lower()
        intermediate = first("intermediate_size", "ffn_dim", "n_inner", "d_ff") or 4 * hidden
        return cls(
            name=name or first("_name_or_path", default="") or model_type or "model",
            hidden=int(hidden),
            intermediate=int(intermediate),
            layers=int(layers),
            heads=int(heads),
            kv_heads=int(first("num_key_value_heads", "num_kv_heads", default=heads)),
            head_dim=int(first("head_dim", default=hidden // heads)),
            vocab=int(first("vocab_size", default=32000)),
            gated_mlp=model_type not in _PLAIN_MLP,
            tied_embeddings=bool(first("tie_word_embeddings", default=model_type in _PLAIN_MLP)),
            dtype=_dtype_name(first("torch_dtype", "dtype", default="float32")),
        )

    def linears(self) -> list[Linear]:
        """The target linears of one block with their input groups (q/k/v and gate/up share one)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [
            Linear("q_proj", q, h, "qkv"),
            Linear("k_proj", kv, h, "qkv"),
            Linear("v_proj", kv, h, "qkv"),
            Linear("o_proj", h, q, "o"),
        ]
        if self.gated_mlp:
            out += [
                Linear("gate_proj", self.intermediate, h, "gate_up"),
                Linear("up_proj", self.intermediate, h, "gate_up"),
                Linear("down_proj", h, self.intermediate, "down"),
            ]
        else:
            out += [Linear("fc1", self.intermediate, h, "fc1"), Linear("fc2", h, self.intermediate, "fc2")]
        return out

    def groups(self) -> dict[str, int]:
        """Distinct inputs of a block, in execution order: group → in_features."""
        found: dict[str, int] = {}
        for lin in self.linears():
            found.setdefault(lin.group, lin.in_features)
        return found

    @property
    def block_params(self) -> int:
        return sum(lin.out_features * lin.in_features for lin in self.linears()) + 2 * self.hidden

    @property
    def outside_params(self) -> int:
        """Embeddings, final norm and (untied) LM head."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.outside_params


def _dtype_name(value: Any) -> str:
    name = str(value).removeprefix("torch.")
    return name if name in DTYPE_BYTES else "float32"


@dataclass
class Phase:
    """Peak bytes of one phase on the compute device and on the host, with the terms that make them."""

    name: str
    device: int
    host: int
    terms: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryPlan:
    shape: ModelShape
    method: str
    recipe: str  # "faithful" | "default"
    sequential: str
    dense_target: bool
    nsamples: int
    seqlen: int
    batch_size: int
    dtype: str
    world_size: int
    device_type: str  # "cpu" | "cuda"
    placement: str  # where activations live: "device" | "host"
    phases: list[Phase]
    seconds: dict[str, float] = field(default_factory=dict)
    reconstruct_epochs: int = 0

    @property
    def peak_device(self) -> int:
        return max(p.device for p in self.phases)

    @property
    def peak_host(self) -> int:
        return max(p.host for p in self.phases)

    @property
    def peak_total(self) -> int:
        """Peak of device + host together (on a CPU run: the process's peak resident memory)."""
        return max(p.device + p.host for p in self.phases)

    @property
    def activation_bytes(self) -> int:
        """Calibration activations that outlive a batch at the peak of the statistics phase."""
        stats = next(p for p in self.phases if p.name == "statistics")
        return sum(v for k, v in stats.terms.items() if k.endswith("stream"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["peak_device"], out["peak_host"], out["peak_total"] = (
            self.peak_device,
            self.peak_host,
            self.peak_total,
        )
        return out

    def table(self) -> str:
        """Fixed-width table of the phases (GiB) and the time estimate."""
        cpu = self.device_type == "cpu"
        where = "CPU (device and host are one memory)" if cpu else f"{self.device_type} + host"
        lines = [
            f"memory plan: {self.shape.name} ({self.shape.params / 1e9:.2f} B params, {self.dtype}), "
            f"{self.method}, {self.recipe} recipe (sequential={self.sequential}, dense_target={self.dense_target}), "
            f"{self.nsamples}×{self.seqlen} tokens, world size {self.world_size}, on {where}, "
            f"activations on the {'host' if self.placement == 'host' and not cpu else 'device'}",
            f"{'phase':<12}{'device GiB':>12}{'host GiB':>12}{'total GiB':>12}  largest terms",
        ]
        for p in self.phases:
            top = sorted(p.terms.items(), key=lambda kv: -kv[1])[:3]
            terms = ", ".join(f"{k} {v / GiB:.2f}" for k, v in top if v > 0)
            dev = p.device / GiB if not cpu else 0.0
            host = p.host / GiB + (p.device / GiB if cpu else 0.0)
            lines.append(f"{p.name:<12}{dev:>12.2f}{host:>12.2f}{(p.device + p.host) / GiB:>12.2f}  {terms}")
        if cpu:
            lines.append(f"peak: {self.peak_total / GiB:.2f} GiB of RAM")
        else:
            lines.append(
                f"peak: device {self.peak_device / GiB:.2f} GiB (+ CUDA context), host {self.peak_host / GiB:.2f} GiB"
            )
        if self.seconds:
            parts = ", ".join(f"{k} {_duration(v)}" for k, v in self.seconds.items() if k != "total")
            lines.append(f"time estimate: {_duration(self.seconds.get('total', 0.0))} ({parts})")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def load_shape(model: str | os.PathLike[str] | None) -> ModelShape:
    """The shape of a model from a built-in name, a config JSON file, a model folder / Hub id (config
    only) or a GGUF file (its metadata; ``None``: the bundled SmolLM2). Never reads weights."""
    from .errors import ModelError

    if model is not None and str(model).lower() in BUILTIN_CONFIGS:
        key = str(model).lower()
        return ModelShape.from_config(BUILTIN_CONFIGS[key], key)
    if model is not None and str(model).endswith(".json"):
        path = Path(model).expanduser()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the config JSON {str(model)!r}: {exc}") from None
        return ModelShape.from_config(data, path.stem)
    from .io import _gguf_cache_folder, _resolve_source

    kind, source, cache_name = _resolve_source(model)
    if kind == "gguf":  # the converted copy's config.json when there is one (parsing GGUF takes seconds)
        cached = _gguf_cache_folder(Path(source), cache_name) / "config.json"
        if cached.is_file():
            data = json.loads(cached.read_text())
            return ModelShape.from_config(
                data, "SmolLM2-135M-Instruct (bundled)" if model is None else str(model)
            )
    try:
        from transformers import AutoConfig

        if kind == "gguf":
            gguf = Path(source)
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelError(
            f"cannot read the config of {source!r}: {type(exc).__name__}: {exc}; pass a config.json path "
            f"or a built-in name ({', '.join(BUILTIN_CONFIGS)})"
        ) from None
    name = "SmolLM2-135M-Instruct (bundled)" if model is None else str(model)
    return ModelShape.from_config(config, name)


def plan_run(
    shape: ModelShape,
    *,
    method: str = "alps",
    recipe: str = "faithful",
    nsamples: int = 128,
    seqlen: int = 2048,
    batch_size: int = 1,
    dtype: str = "bfloat16",
    world_size: int = 1,
    device_type: str = "cuda",
    placement: str = "device",
    sequential: str | None = None,
    dense_target: bool | None = None,
    precision_bytes: int = 4,
    eval_seqlen: int | None = None,
    device_flops: tuple[float, float] | None = None,
    reconstruct_epochs: int = 0,
) -> MemoryPlan:
    """Predict the peak memory of each phase (and the time) of one rank of a pruning run.

    :param recipe: ``"faithful"`` (block statistics, fit to pruned outputs) or ``"default"`` (dense
        target + sub-layer statistics); ``sequential`` / ``dense_target`` override the recipe's.
    :param placement: where calibration activations live, ``"device"`` or ``"host"`` (offloaded).
    :param precision_bytes: bytes per element of the solver's matrices (ALPS ``precision``).
    :param device_flops: (float32, bf16) flop/s of the device for the time estimate (default: the
        :data:`DEVICE_FLOPS` table for a GPU, a quick measurement on a CPU).
    :param reconstruct_epochs: epochs of the per-block reconstruction (0: none); adds its phase.
    """
    if recipe not in ("faithful", "default"):
        raise ValueError(f"recipe must be 'faithful' or 'default', got {recipe!r}")
    if placement not in ("device", "host"):
        raise ValueError(f"placement must be 'device' or 'host', got {placement!r}")
    if dense_target is None:
        dense_target = recipe == "default"
    if sequential is None:
        sequential = "sublayer" if dense_target else "block"
    a = DTYPE_BYTES[dtype]
    p = precision_bytes
    n_rank = math.ceil(nsamples / max(world_size, 1))
    T = n_rank * seqlen  # calibration tokens on this rank
    t = min(batch_size, n_rank) * seqlen  # tokens of one batch
    h, i = shape.hidden, shape.intermediate
    groups = shape.groups()
    cpu = device_type == "cpu"
    on_device = placement == "device" or cpu

    stream = T * h * a
    streams = {"hidden stream": stream}
    if dense_target or reconstruct_epochs:
        streams["dense stream"] = stream
    block = shape.block_params * a
    forward = int(t * (FORWARD_HIDDEN * h + FORWARD_INTERMEDIATE * i) * a)
    ws = SOLVER_WORKSPACE.get(method, SOLVER_WORKSPACE["wanda"])

    def split(device_terms: dict[str, int], activation_terms: dict[str, int]) -> tuple[int, int, dict]:
        dev = sum(device_terms.values()) + (sum(activation_terms.values()) if on_device else 0)
        host_act = 0 if on_device else sum(activation_terms.values())
        return dev, host_act, {**device_terms, **activation_terms}

    host_fixed = HOST_BASELINE + shape.params * a + nsamples * seqlen * 8

    def phase(name: str, device_terms: dict[str, int], activation_terms: dict[str, int]) -> Phase:
        dev, host_act, terms = split(device_terms, activation_terms)
        terms = {"weights (host)": shape.params * a, **terms}
        return Phase(name, dev, host_fixed + host_act, terms)

    # the gram sums of a statistics stage (float64, plus the float64 cross term with the dense target)
    def gram_bytes(in_f: int) -> int:
        return in_f * in_f * 8 * (2 if dense_target else 1) + in_f * 8

    if sequential == "block":
        stage_grams = [sum(gram_bytes(n) for n in groups.values())]
        stage_groups = [list(groups)]
    else:
        stage_grams = [gram_bytes(n) for n in groups.values()]
        stage_groups = [[g] for g in groups]
    grams_peak = max(stage_grams)
    max_in = max(groups.values())
    batch_stats = t * max_in * 4 * (2 if dense_target else 1) + max_in * max_in * 4

    # the dense target keeps the original weights of the layers pruned before the block's last stage
    # (the dense stream's later passes compute with them), on the device next to the block
    last_group = list(groups)[-1]
    dense_weights = (
        sum(lin.out_features * lin.in_features for lin in shape.linears() if lin.group != last_group) * a
        if dense_target
        else 0
    )
    kept = {"dense weights": dense_weights} if dense_target else {}

    phases = [
        phase(
            "capture",
            {"outside blocks": shape.outside_params * a, "batch": t * h * (a + 4)},
            {"hidden stream": stream},
        ),
        phase(
            "statistics",
            {"block": block, **kept, "grams": grams_peak, "batch temporaries": forward + batch_stats},
            streams,
        ),
    ]

    def solve_bytes(lin: Linear) -> int:
        reduce = dense_target and method not in NATIVE_DENSE_TARGET
        return ws.bytes(lin.in_features, lin.out_features, p, reduce) + row_slab_bytes(
            lin.out_features, lin.in_features
        )

    worst = 0
    worst_terms: dict[str, int] = {}
    linears = shape.linears()
    for stage, grams in zip(stage_groups, stage_grams, strict=True):
        for lin in (lin for lin in linears if lin.group in stage):
            # the stage's pruned weights are all held until they are written back together
            stage_weights = sum(x.out_features * x.in_features for x in linears if x.group in stage) * a
            total = grams + solve_bytes(lin) + stage_weights
            if total > worst:
                worst = total
                worst_terms = {
                    "grams": grams,
                    f"workspace ({lin.name})": solve_bytes(lin),
                    "pruned weights (stage)": stage_weights,
                }
    phases.append(phase("solve", {"block": block, **kept, **worst_terms}, streams))
    if reconstruct_epochs:
        # Adam on float32 copies of the block: the copy, its gradient and two moments (4 × 4 bytes a
        # parameter), the float32 keep-masks of the linears, and one batch's autograd tensors
        # (the forward's temporaries in float32, and as much again for their gradients)
        linear_params = sum(lin.out_features * lin.in_features for lin in shape.linears())
        phases.append(
            phase(
                "reconstruct",
                {
                    "block": block,
                    "float32 copy, gradient, Adam moments": shape.block_params * 16,
                    "keep-masks": linear_params * 4,
                    "batch autograd": int(2 * t * (FORWARD_HIDDEN * h + FORWARD_INTERMEDIATE * i) * 4),
                },
                streams,
            )
        )
    phases.append(
        phase(
            "propagate",
            {"block": block, "batch temporaries": forward, "batch output": t * h * a},
            streams,
        )
    )
    # evaluation streams the model block by block (one block + the modules outside the blocks on the
    # device); keeping the whole model resident instead needs `resident_model_bytes` more
    ev_seqlen = eval_seqlen or seqlen
    ev_logits = ev_seqlen * shape.vocab * 4 * 2  # float32 logits and their log-softmax
    ev_forward = int(ev_seqlen * (FORWARD_HIDDEN * h + FORWARD_INTERMEDIATE * i) * a)
    phases.append(
        phase(
            "evaluate",
            {
                "block": block,
                "outside blocks": shape.outside_params * a,
                "window temporaries": ev_forward,
                "logits": ev_logits,
            },
            {},
        )
    )
    if cpu:  # one memory: the weights already counted on the host are not copied to a device
        for ph in phases:
            for key in ("block", "outside blocks"):
                if key in ph.terms:
                    ph.device -= ph.terms.pop(key)
    plan = MemoryPlan(
        shape=shape,
        method=method,
        recipe=recipe,
        sequential=sequential,
        dense_target=dense_target,
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=batch_size,
        dtype=dtype,
        world_size=world_size,
        device_type=device_type,
        placement=placement,
        phases=phases,
        reconstruct_epochs=reconstruct_epochs,
    )
    plan.seconds = estimate_seconds(plan, device_flops)
    return plan


# ---- time -----------------------------------------------------------------------------------------


def cpu_flops() -> tuple[float, float]:
    """This CPU's float32 matmul rate (≈0.1 s to measure): one thread's rate measured in CPU time (so
    other busy processes do not distort it) times torch's thread count. ``ALPSPRUNE_CPU_FLOPS``
    overrides. On a busy machine the real run takes longer than this estimate."""
    env = os.environ.get("ALPSPRUNE_CPU_FLOPS")
    if env:
        rate = float(env)
        return rate, rate
    import time

    import torch

    threads = torch.get_num_threads()
    n = 512
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.set_num_threads(1)
    try:
        a @ b
        best = math.inf
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(4):
                a @ b
            best = min(best, (time.process_time() - t0) / 4)
    finally:
        torch.set_num_threads(threads)
    rate = 2.0 * n**3 / max(best, 1e-6) * threads
    return rate, rate / 2  # bf16 matmuls on CPUs are no faster than float32


def device_rates(device_name: str | None) -> tuple[float, float] | None:
    """(float32, bf16) peak flop/s of a GPU named like ``NVIDIA A100-SXM4-80GB``; ``None`` if unknown."""
    if not device_name:
        return None
    low = device_name.lower().replace(" ", "")
    for key, rates in DEVICE_FLOPS.items():
        if key in low:
            return rates
    return None


def estimate_seconds(plan: MemoryPlan, rates: tuple[float, float] | None = None) -> dict[str, float]:
    """Rough seconds per phase from flop counts (forward passes, gram products, factorisations, solver
    iterations; see ``bench/speed.py`` for the ALPS model) at a share of the device's peak rate."""
    from .solvers.alps import symmetric_product_flops

    shape = plan.shape
    cpu = plan.device_type == "cpu"
    if rates is None:
        rates = cpu_flops() if cpu else DEVICE_FLOPS["a100"]
    f32, half = rates
    mm32 = f32 * (1.0 if cpu else MATMUL_EFFICIENCY)
    mm_model = (f32 if plan.dtype == "float32" else half) * (1.0 if cpu else MATMUL_EFFICIENCY)
    factor = f32 * (CPU_FACTOR_EFFICIENCY if cpu else FACTOR_EFFICIENCY)
    T = math.ceil(plan.nsamples / max(plan.world_size, 1)) * plan.seqlen
    per_token = 2.0 * shape.block_params + 2.0 * plan.seqlen * shape.heads * shape.head_dim
    groups = shape.groups()
    # block passes: faithful = one statistics pass + one propagation; default = the dense stream,
    # one (partial, ≈ half a block on average) pass per input group and the propagation
    passes = 2.0 if not plan.dense_target else 2.0 + 0.5 * len(groups)
    forward = shape.layers * passes * T * per_token / mm_model
    gram_flops = sum(2.0 * T * n * n * (2 if plan.dense_target else 1) for n in groups.values())
    statistics = shape.layers * gram_flops / mm32
    solve = 0.0
    for g, n in groups.items():
        members = [lin for lin in shape.linears() if lin.group == g]
        if plan.method == "alps":
            solve += 9.0 * n**3 / factor
            for lin in members:
                mm = 2.0 * lin.out_features * n * n
                it = ALPS_ITERATIONS
                solve += (it * mm + (it // 3 + 1) * symmetric_product_flops(n) + 12 * mm) / mm32
        elif plan.method == "sparsegpt":
            solve += 5.0 / 3.0 * n**3 / factor
            for lin in members:
                solve += lin.out_features * n * n / mm32
                if not cpu:
                    solve += n * SPARSEGPT_COLUMN_SECONDS_GPU
        if plan.dense_target and plan.method not in NATIVE_DENSE_TARGET:
            solve += n**3 / 3 / factor + sum(4.0 * lin.out_features * n * n for lin in members) / mm32
    solve *= shape.layers / max(plan.world_size, 1)
    out = {
        "forward passes": forward,
        "statistics": statistics,
        "solve": solve,
    }
    if plan.reconstruct_epochs:  # per epoch a forward and a backward (≈ 2 forwards) in float32, plus
        # the before/after error passes; every rank runs every step (see alpsprune.reconstruct)
        calib = plan.nsamples * plan.seqlen
        passes = 3.0 * plan.reconstruct_epochs + 2.0
        out["reconstruct"] = shape.layers * passes * calib * per_token / mm32
    out["total"] = sum(out.values())
    return out


# ---- placement --------------------------------------------------------------------------------------


def available_memory(device_type: str, index: int | None = None) -> int:
    """Free bytes on the compute device now: ``torch.cuda.mem_get_info`` on a GPU, available RAM on a CPU."""
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def parse_memory(text: str) -> int:
    """``"80GB"``, ``"24GiB"``, ``"512MB"``, ``"1.5T"`` or a plain number of bytes → bytes (GB = GiB here)."""
    s = text.strip().upper().replace(" ", "")
    units = {"T": 1024**4, "G": GiB, "M": MiB, "K": 1024}
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in units:
            s = s[: -len(suffix)]
            break
    scale = 1
    if s and s[-1] in units:
        scale = units[s[-1]]
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"cannot read memory size {text!r}; use e.g. 80GB, 24GiB or 512MB") from None
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * scale)


def choose_placement(plans: dict[str, MemoryPlan], budget: int) -> str | None:
    """Activations on the device if that plan fits ``budget`` (device bytes), else on the host if that
    fits, else ``None`` (nothing fits). ``plans`` maps placement → plan. On a CPU the budget is RAM."""
    for placement in ("device", "host"):
        plan = plans.get(placement)
        if plan is None:
            continue
        need = plan.peak_total if plan.device_type == "cpu" else plan.peak_device + CUDA_CONTEXT
        if need <= budget:
            return placement
    return None


# ---- the CLI's use ------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """The plans of a run for each activation placement, the memory budget and the placement chosen."""

    plans: dict[str, MemoryPlan]
    budget: int | None  # None: unknown (planning for a GPU this machine does not have)
    placement: str | None  # None: nothing fits (or no budget)

    @property
    def chosen(self) -> MemoryPlan:
        """The plan of the chosen placement (when nothing fits: the leanest one, offloaded)."""
        return self.plans.get(self.placement or "host") or next(iter(self.plans.values()))

    def describe(self) -> str:
        plan = self.chosen
        lines = [plan.table()]
        cpu = plan.device_type == "cpu"
        if not cpu:
            for placement, other in self.plans.items():
                lines.append(
                    f"activations on the {placement}: device peak {other.peak_device / GiB:.2f} GiB, "
                    f"host peak {other.peak_host / GiB:.2f} GiB"
                )
        what = "RAM" if cpu else f"{plan.device_type} memory"
        if self.budget is None:
            for gib in (80, 24):
                fits = choose_placement(self.plans, gib * GiB)
                choice = f"activations on the {fits}" if fits else "does NOT fit even with offloading"
                lines.append(f"on a {gib} GB GPU: {choice}")
            lines.append("budget: no GPU here (pass --max-memory for a verdict on another size)")
            return "\n".join(lines)
        verdict = (
            f"fits: activations on the {self.placement}"
            if self.placement and not cpu
            else "fits"
            if self.placement
            else "does NOT fit"
        )
        lines.append(f"budget: {self.budget / GiB:.2f} GiB of {what} → {verdict}")
        return "\n".join(lines)

    def refusal(self) -> str:
        plan = self.plans.get("host") or self.chosen
        cpu = plan.device_type == "cpu"
        need = plan.peak_total if cpu else plan.peak_device + CUDA_CONTEXT
        where = "RAM" if cpu else f"{plan.device_type} memory even with activations offloaded to the host"
        return (
            f"memory plan: this run needs ≈{need / GiB:.1f} GiB of {where} but the budget is "
            f"{self.budget / GiB:.1f} GiB (--max-memory); use fewer --nsamples or a shorter --seqlen, more "
            "GPUs (torchrun), or a larger device (see `alpsprune prune ... --dry-run`)"
        )


def plan_cli_run(
    model: str | None,
    *,
    method: str,
    sequential: str,
    dense_target: bool,
    nsamples: int,
    seqlen: int,
    batch_size: int,
    dtype: str,
    world_size: int,
    device: str,
    max_memory: str | None,
    offload: bool | None,
    precision_bytes: int = 4,
    eval_seqlen: int | None = None,
    reconstruct_epochs: int = 0,
) -> RunPlan:
    """Plans for both placements of ``model`` (config only), the budget and the placement to use.

    ``offload`` True/False forces host/device placement (only that plan is considered); ``None`` picks
    the device when it fits. The budget is ``max_memory`` or what the device has free now.
    """
    import torch

    shape = load_shape(model)
    dev = torch.device(device)
    dtype_name = shape.dtype if dtype == "auto" else dtype
    if model is None and dtype == "auto":
        dtype_name = "float32"  # the bundled GGUF loads dequantized to float32
    recipe = "default" if dense_target else "faithful"
    rates = None
    if dev.type == "cuda" and torch.cuda.is_available():
        rates = device_rates(torch.cuda.get_device_name(dev))
    placements = ["device", "host"] if offload is None else ["host" if offload else "device"]
    if dev.type == "cpu":
        placements = ["device"]
    plans = {
        pl: plan_run(
            shape,
            method=method,
            recipe=recipe,
            sequential=sequential,
            dense_target=dense_target,
            nsamples=nsamples,
            seqlen=seqlen,
            batch_size=batch_size,
            dtype=dtype_name,
            world_size=world_size,
            device_type=dev.type,
            placement=pl,
            precision_bytes=precision_bytes,
            eval_seqlen=eval_seqlen,
            device_flops=rates,
            reconstruct_epochs=reconstruct_epochs,
        )
        for pl in placements
    }
    if max_memory is not None:
        budget = parse_memory(max_memory)
    elif dev.type == "cuda" and torch.cuda.is_available():
        budget = available_memory("cuda", dev.index) + CUDA_CONTEXT  # the context is already taken
    elif dev.type == "cuda":
        return RunPlan(plans, None, None)
    else:
        budget = available_memory(dev.type)
    return RunPlan(plans, budget, choose_placement(plans, budget))
