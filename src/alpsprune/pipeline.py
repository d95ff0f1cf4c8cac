"""One-shot sequential pruning of a whole decoder LM (SPEC §4). Data flow and devices only; no maths.

Per block: gather input statistics with forward hooks (one :class:`Gram` per distinct input
tensor, so q/k/v and gate/up share one), solve every target linear, write the pruned weights
back, then re-run the *pruned* block to produce the next block's inputs. Weights stay where
they are; one block at a time visits the compute device, once per block (:mod:`alpsprune.streaming`
moves the activations). With sub-layer statistics the block runs once per stage; parts of it that
are already final may replay their recorded outputs instead of being recomputed, within the
``replay_memory`` budget (:mod:`alpsprune.models.replay`; exact either way).

Activation memory: the pruned stream, replaced in place by each block's outputs, and with the
dense-output target one more stream (the dense model's hidden states). The dense block's layer
inputs a stage needs are recomputed batch by batch from the dense stream (with the block's dense
weights swapped in) and used at once, so nothing else outlives a batch
(:func:`alpsprune.streaming.activation_bytes`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import allocate
from .errors import AlpsPruneError, SolverError, TargetError
from .models import (
    find_decoder_blocks,
    find_target_linears,
    get_weight,
    input_hooks,
    require_targets,
    run_block,
    set_weight,
)
from .models.replay import BlockReplay
from .parallel import Parallel, single_process
from .reconstruct import Reconstruction, reconstruct_block
from .report import LayerRecord, PruneReport
from .solvers import prune_layer, solver_options
from .sparsity import SparsitySpec
from .stats import Gram
from .streaming import ActivationStream, Placement, capture_stream, propagate, resolve_device, visiting

log = logging.getLogger("alpsprune")

SEQUENTIAL_MODES = ("block", "sublayer")
ALLOCATION_MODES = ("uniform", "owl", "curve", "evo")

# The paper's algorithm: grams of a whole block from one pass, layers fit to their own pruned-model
# outputs, the same sparsity everywhere.
FAITHFUL = {"sequential": "block", "dense_target": False, "allocation": "uniform"}
# Defaults where they beat the paper's pipeline on held-out perplexity (issue 9; bench/results/beyond.md,
# bundled SmolLM2): error correction (dense-output targets, which need sub-layer statistics) for both
# weight-fitting solvers; OWL allocation on top helped ALPS (70/80%: −22/−49% with both) but hurt
# SparseGPT; at 2:4 the dense target helped SparseGPT (−5%) and not ALPS (+4.5%). ALPS's corrections
# apply only *above* 60%: at 60% the three pipelines were within run-to-run noise of each other (two
# runs: faithful 60.50/59.36, dense target 59.86/60.07, + OWL 59.69/59.76) and the paper's is 20–35%
# faster; at 65% the dense target gave −8% (78.06 vs 84.93). Wanda, DSnoT and magnitude run as published.
# Issue 18: ALPS also reconstructs every block towards the dense block's outputs (alpsprune.reconstruct,
# token-relative loss; bench/results/quality.md, held-out wiki): above 60% EPOCHS_HIGH epochs (70%:
# 102.67 → see README), at 60% and below and at N:M 2 epochs after the paper's layer fits (60%: 59.36 →
# 47.46, 2:4: see README), each within 3× the time of the pipeline it replaced.
_CORRECTED = {"sequential": "sublayer", "dense_target": True, "allocation": "uniform"}
_FAITHFUL_FITS_RECONSTRUCTED = {**FAITHFUL, "reconstruct": {"epochs": 2}}
RECOMMENDED = {
    "alps": {
        "unstructured": {
            **_CORRECTED,
            "allocation": "owl",
            "reconstruct": {"epochs": 4},
            "above_sparsity": 0.6,
            "otherwise": _FAITHFUL_FITS_RECONSTRUCTED,
        },
        "nm": _FAITHFUL_FITS_RECONSTRUCTED,
    },
    "sparsegpt": {"unstructured": _CORRECTED, "nm": _CORRECTED},
}


def recommended_recipe(method: str, spec: SparsitySpec) -> dict:
    """The recipe :data:`RECOMMENDED` gives ``method`` for this pattern (:data:`FAITHFUL` if none);
    a recipe with ``above_sparsity`` applies above it, its ``otherwise`` at and below."""
    recipe = RECOMMENDED.get(method, {}).get("nm" if spec.is_nm else "unstructured", FAITHFUL)
    if "above_sparsity" in recipe and (spec.sparsity or 0.0) <= recipe["above_sparsity"]:
        return recipe.get("otherwise", FAITHFUL)
    return recipe


def resolve_reconstruction(
    method: str,
    spec: SparsitySpec,
    reconstruction: Reconstruction | bool | None = None,
    *,
    faithful: bool = False,
) -> Reconstruction | None:
    """The reconstruction step to run, every setting filled: ``None`` follows the recipe (on or off),
    ``False`` is off, ``True`` or a :class:`Reconstruction` is on, with the recipe's settings for
    those it leaves unset. The paper's algorithm has none."""
    if reconstruction is False:
        return None
    if faithful:
        if reconstruction is not None:
            raise AlpsPruneError(
                "faithful=True is the paper's algorithm, which has no reconstruction step; drop one of them"
            )
        return None
    recipe = recommended_recipe(method, spec).get("reconstruct")
    if reconstruction is None:
        if recipe is None:
            return None
        reconstruction = Reconstruction()
    elif reconstruction is True:
        reconstruction = Reconstruction()
    return reconstruction.resolved(recipe)


def resolve_recipe(
    method: str,
    spec: SparsitySpec,
    *,
    faithful: bool = False,
    sequential: str | None = None,
    dense_target: bool | None = None,
    allocation: dict[str, float] | str | None = None,
    reconstruction: Reconstruction | bool | None = None,
) -> tuple[str, bool, dict[str, float] | str]:
    """Fill the options left at ``None`` from the method's recipe; refuse contradictions.

    ``faithful=True`` is the paper's algorithm exactly (:data:`FAITHFUL`); otherwise the defaults come
    from :func:`recommended_recipe` (the method, the kind of pattern and, for ALPS, the sparsity);
    methods not listed there default to :data:`FAITHFUL`. Allocation can only be non-uniform for an
    unstructured sparsity.
    """
    if faithful:
        clashes = [
            f"{key}={value!r}"
            for key, value in (
                ("sequential", sequential),
                ("dense_target", dense_target),
                ("allocation", allocation),
            )
            if value is not None and value != FAITHFUL[key]
        ]
        if clashes:
            raise AlpsPruneError(
                f"faithful=True reproduces the paper's algorithm and cannot be combined with {', '.join(clashes)}; "
                "drop one of them"
            )
    resolve_reconstruction(
        method, spec, reconstruction, faithful=faithful
    )  # refuses faithful + reconstruction
    recipe = FAITHFUL if faithful else recommended_recipe(method, spec)
    dense_target = recipe["dense_target"] if dense_target is None else bool(dense_target)
    if sequential is None:
        sequential = "sublayer" if dense_target else recipe["sequential"]
    if sequential not in SEQUENTIAL_MODES:
        raise AlpsPruneError(f"sequential must be one of {SEQUENTIAL_MODES}, got {sequential!r}")
    if dense_target and sequential == "block":
        # A layer can only correct the error it will really see: with block-mode statistics o_proj's
        # inputs come from the *unpruned* q/k/v, so the dense target corrects the wrong error (measured
        # on SmolLM2 at 70%: ppl 6160 vs 125 faithful). Dense targets therefore use sublayer statistics.
        raise AlpsPruneError(
            "dense_target=True needs sequential='sublayer' (a layer can only correct the error it will "
            "see); for block statistics also set dense_target=False (--no-dense-target) or faithful=True"
        )
    if allocation is None:
        allocation = recipe["allocation"]
    if isinstance(allocation, str):
        if allocation not in ALLOCATION_MODES:
            raise AlpsPruneError(
                f"allocation must be one of {ALLOCATION_MODES} or a dict, got {allocation!r}"
            )
        if allocation != "uniform" and spec.is_nm:
            raise AlpsPruneError(
                f"allocation={allocation!r} needs an unstructured sparsity, not the N:M pattern {spec.label}"
            )
    return sequential, dense_target, allocation


@dataclass
class PrunePlan:
    """Everything validated before heavy work: blocks, target layers per block, pattern per layer."""

    blocks_path: str
    blocks: nn.ModuleList
    layers: list[dict[str, nn.Module]]  # per block: full name → module
    specs: dict[str, SparsitySpec]  # full name → pattern
    method: str
    options: dict = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [name for block in self.layers for name in block]


def plan_pruning(
    model: nn.Module,
    *,
    method: str = "alps",
    sparsity: float | None = None,
    mask_structure: str | None = None,
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    allocation: dict[str, float] | None = None,
    **solver_opts,
) -> PrunePlan:
    """Validate the request against the model without doing any heavy work (raises AlpsPruneError)."""
    try:
        allowed = solver_options(method)  # raises for an unknown method
    except ValueError as exc:
        raise AlpsPruneError(str(exc)) from None
    try:
        spec = SparsitySpec.parse(sparsity, mask_structure)
    except ValueError as exc:  # the pattern itself is invalid (shape fit is checked per layer below)
        raise TargetError(str(exc)) from None
    unknown = sorted(set(solver_opts) - set(allowed))
    if unknown:
        raise AlpsPruneError(
            f"unknown option(s) {unknown} for method {method!r}; valid: {', '.join(allowed) or 'none'}"
        )
    targets = [targets] if isinstance(targets, str) else targets
    ignore = [ignore] if isinstance(ignore, str) else ignore
    if getattr(model, "config", None) is not None:
        from .io import require_decoder_only  # BERT & co. load as *LMHeadModel: refuse them by config

        require_decoder_only(model.config, type(model).__name__)
    path, blocks = find_decoder_blocks(model)
    require_targets(model, targets, ignore)
    layers = [find_target_linears(block, f"{path}.{i}", targets, ignore) for i, block in enumerate(blocks)]
    specs: dict[str, SparsitySpec] = {}
    for block_layers in layers:
        for name, module in block_layers.items():
            layer_spec = spec
            if allocation is not None and name in allocation and not spec.is_nm:
                layer_spec = SparsitySpec.parse(allocation[name])
            out_f, in_f = get_weight(module).shape
            try:
                layer_spec.check_shape(out_f, in_f, name)
            except ValueError as exc:
                raise TargetError(str(exc)) from None
            specs[name] = layer_spec
    return PrunePlan(path, blocks, layers, specs, method, dict(solver_opts))


# ---- statistics -----------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once the statistics a stage needs are in; skips the rest of the block."""


def input_groups(
    block: nn.Module,
    layers: dict[str, nn.Module],
    hidden: torch.Tensor,
    kwargs: dict,
    replay: BlockReplay | None = None,
) -> list[list[str]]:
    """Target linears grouped by the input tensor they read, in execution order.

    Found by running the block once and comparing input storage: linears that receive the very same
    tensor (q/k/v after the norm, gate/up) share one group. The recorded tensors are kept alive during
    the pass so their memory cannot be reused by another tensor. Linears the pass never reached (e.g.
    unrouted experts) come last, alone. The same pass traces the block for ``replay``.
    """
    seen: list[tuple[tuple, str, torch.Tensor]] = []

    def record(name: str, x: torch.Tensor) -> None:
        seen.append(((x.data_ptr(), tuple(x.shape), x.stride(), x.dtype), name, x))

    tracing = replay.trace() if replay is not None else contextlib.nullcontext()
    with input_hooks(layers, record), tracing, torch.no_grad():
        run_block(block, hidden, kwargs)
    groups: dict[tuple, list[str]] = {}
    for key, name, _ in seen:
        if name not in (n for g in groups.values() for n in g):
            groups.setdefault(key, []).append(name)
    ordered = list(groups.values())
    reached = {n for g in ordered for n in g}
    ordered += [[name] for name in layers if name not in reached]
    return ordered


class DenseWeights:
    """The dense weights of a block's target linears, for passes of the dense stream mid-block.

    :meth:`keep` saves a layer's weight just before it is overwritten by its pruned version (only
    layers pruned before the block's last stage need it: the last stage's dense pass runs before
    its own layers change); :meth:`active` swaps the saved tensors in for the duration (pointer
    swaps, no copies), so the block computes as the dense model's block.
    """

    def __init__(self) -> None:
        self.saved: dict[nn.Module, torch.Tensor] = {}

    def keep(self, module: nn.Module) -> None:
        self.saved.setdefault(module, module.weight.data.clone())

    @contextlib.contextmanager
    def active(self):
        current = {m: m.weight.data for m in self.saved}
        for m, w in self.saved.items():
            m.weight.data = w
        try:
            yield
        finally:
            for m, w in current.items():
                m.weight.data = w

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.saved.values())


def dense_layer_inputs(
    block: nn.Module,
    leaders: dict[str, nn.Module],
    hidden: torch.Tensor,
    kwargs: dict,
    run_to_end: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The inputs of ``leaders`` for one batch of the dense stream (the caller makes the block dense).

    Stops as soon as every leader has its input, unless ``run_to_end``: then also returns the
    block's output (the next block's dense input), so the last stage needs no separate pass.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        captured[name] = x.detach()
        if not run_to_end and len(captured) == len(leaders):
            raise _StopForward

    output = None
    with input_hooks(leaders, keep), torch.no_grad(), contextlib.suppress(_StopForward):
        output = run_block(block, hidden, kwargs)
    return captured, output


def collect_grams(
    block: nn.Module,
    layers: dict[str, nn.Module],
    groups: list[list[str]],
    hidden: ActivationStream,
    kwargs_of: Callable[[int], dict],
    device: torch.device,
    dense: ActivationStream | None = None,
    replay: BlockReplay | None = None,
    dense_weights: DenseWeights | None = None,
    advance_dense: bool = False,
    dense_inputs: list[dict[str, torch.Tensor]] | None = None,
) -> dict[str, Gram]:
    """One Gram per group (keyed by the group's first layer) over all calibration batches.

    With a ``dense`` stream the Grams also accumulate the cross term for the dense-output target:
    batch by batch, the dense block (``dense_weights`` swapped in) first gives each leader's dense
    input, used at once and dropped, so no layer input outlives its batch. ``advance_dense``: the
    dense passes run to the end of the block and replace the dense stream's batches by the block's
    outputs (for the block's last stage). Each pruned-stream forward stops as soon as every group
    has its input. ``replay`` (set up by the caller) gets the batch index before each forward and
    is paused during dense passes. ``dense_inputs`` (per batch, leader → dense input; the stored
    alternative to recomputing, see :func:`store_dense_inputs`) replaces the dense passes; the
    entries used are removed.
    """
    leaders = {g[0]: layers[g[0]] for g in groups}
    grams = {name: Gram(get_weight(m).shape[1], device=device) for name, m in leaders.items()}
    pending: set[str] = set()
    dense_x: dict[str, torch.Tensor] = {}
    with_dense = dense is not None or dense_inputs is not None

    def accumulate(name: str, x: torch.Tensor) -> None:
        grams[name].add_batch(x, dense_x[name] if with_dense else None)
        pending.discard(name)
        if not pending:
            raise _StopForward

    with torch.no_grad():
        for batch_index in range(len(hidden)):
            kwargs = kwargs_of(batch_index)
            if dense_inputs is not None:
                dense_x = {name: dense_inputs[batch_index].pop(name).to(device) for name in leaders}
            elif dense is not None:
                with (
                    replay.paused() if replay is not None else contextlib.nullcontext(),
                    dense_weights.active() if dense_weights is not None else contextlib.nullcontext(),
                ):
                    dense_x, output = dense_layer_inputs(
                        block, leaders, dense.fetch(batch_index), kwargs, run_to_end=advance_dense
                    )
                if advance_dense:
                    dense.put(batch_index, output)
            pending.update(leaders)
            if replay is not None:
                replay.batch = batch_index
            with input_hooks(leaders, accumulate), contextlib.suppress(_StopForward):
                run_block(block, hidden.fetch(batch_index), dict(kwargs))
            dense_x = {}
    return grams


def store_dense_inputs(
    block: nn.Module,
    leaders: dict[str, nn.Module],
    dense: ActivationStream,
    kwargs_of: Callable[[int], dict],
    store: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """One pass of the (still dense) block over the dense stream: every leader's input per batch,
    kept on ``store``, and the dense stream advanced past the block in place.

    The fast alternative to recomputing the dense inputs stage by stage, for when memory allows:
    it holds all the block's distinct layer inputs over all batches (≈ 5.7 hidden streams for a
    LLaMA-2-7B block), dropped stage by stage as they are used.
    """
    stored = []
    for b in range(len(dense)):
        captured, output = dense_layer_inputs(block, leaders, dense.fetch(b), kwargs_of(b), run_to_end=True)
        stored.append({name: x.to(store) for name, x in captured.items()})
        dense.put(b, output)
    return stored


def dense_input_bytes(layers: dict[str, nn.Module], groups: list[list[str]], stream: ActivationStream) -> int:
    """Bytes :func:`store_dense_inputs` would hold: every leader's input width over all tokens."""
    tokens = sum(math.prod(stream.batch_shape(b)[:-1]) for b in range(len(stream)))
    width = sum(get_weight(layers[g[0]]).shape[1] for g in groups)
    return tokens * width * stream.element_size


# ---- the loop -------------------------------------------------------------------------------------


def prune_model(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    method: str = "alps",
    sparsity: float | None = None,
    mask_structure: str | None = None,
    targets: list[str] | str | None = None,
    ignore: list[str] | str | None = None,
    device: str | torch.device | None = None,
    faithful: bool = False,
    sequential: str | None = None,
    dense_target: bool | None = None,
    allocation: dict[str, float] | str | None = None,
    offload_activations: bool | str = False,
    offload_dir=None,
    replay_memory: int | None = 0,
    release_blocks: bool = False,
    batch_size: int = 1,
    progress: bool = True,
    checkpoint_dir=None,
    resume: bool = False,
    parallel: Parallel | None = None,
    reconstruction: Reconstruction | bool | None = None,
    **solver_opts,
) -> PruneReport:
    """Prune every target linear of a Hugging Face decoder LM in place, block by block.

    :param model: a loaded ``transformers`` causal LM (any dtype); its weights stay on their device.
    :param calibration: LongTensor ``(nsamples, seqlen)`` of token ids (see :func:`alpsprune.get_calibration`).
    :param method: ``alps`` | ``sparsegpt`` | ``wanda`` | ``magnitude`` | ``dsnot``.
    :param sparsity: fraction of weights removed per layer (exactly one of this and ``mask_structure``).
    :param mask_structure: ``"N:M"``: at most N kept in every M consecutive inputs (``"2:4"``).
    :param targets: regexes on full module names selecting layers (default: every linear in the blocks).
    :param ignore: regexes on full module names to skip.
    :param device: compute device (default: CUDA if available, else CPU).
    :param faithful: the paper's pipeline exactly: ``sequential="block"``, no dense target, uniform
        sparsity. Otherwise options left at ``None`` come from the method's recommended recipe
        (:data:`RECOMMENDED`: ALPS above 60% unstructured sparsity dense target + OWL + 4 epochs of
        reconstruction, otherwise the paper's layer fits + 2 epochs of reconstruction; SparseGPT dense
        target; see :func:`resolve_recipe`).
    :param sequential: ``"block"`` — all grams of a block from one pass over the dense block (the
        authors' choice); ``"sublayer"`` — re-collect the grams of later linears after the earlier
        ones in the block are pruned.
    :param dense_target: fit each layer to the *dense* model's outputs on the dense inputs (needs a
        second activation stream; costs one more block pass and the dense inputs of every layer).
        Needs ``sequential="sublayer"`` (the default when it is on).
    :param allocation: per-layer sparsity: ``"uniform"``, ``"owl"``, ``"curve"`` (computed here with
        :func:`alpsprune.allocation.allocate`) or a dict (full name → fraction) overriding ``sparsity``.
    :param offload_activations: where the calibration activations (the pruned stream, the dense
        stream and the replay cache) live between passes: ``False``/``"device"`` on the compute device,
        ``True``/``"host"`` in CPU memory, ``"disk"`` in files under ``offload_dir`` (default: a
        temporary folder, or ``$ALPSPRUNE_OFFLOAD_DIR``). One block and one batch at a time are on
        the device either way (:mod:`alpsprune.streaming`; bytes per phase:
        :func:`alpsprune.streaming.activation_bytes`).
    :param replay_memory: bytes the replay cache may hold (outputs of the finished parts of a block,
        reused by later passes over it instead of recomputing them; see
        :mod:`alpsprune.models.replay`). ``0`` (default): off — nothing but the streams outlives a
        batch; ``None``: no limit (fastest; about 6 hidden streams for a LLaMA block). Results are
        bit-identical whatever the budget.
    :param release_blocks: free every block after it is pruned (its weights end on the ``meta``
        device): for torchrun ranks other than 0, which only help compute (rank 0 keeps, evaluates
        and saves the pruned model), so that each holds one block instead of a whole pruned copy
        (:func:`alpsprune.streaming.visiting`). The returned report is complete; the model is not.
    :param batch_size: calibration samples per forward pass.
    :param reconstruction: after a block's layers are solved, train its kept weights (masks fixed)
        towards the dense block's outputs (:mod:`alpsprune.reconstruct`): a
        :class:`~alpsprune.reconstruct.Reconstruction` (settings it leaves unset are the recipe's),
        ``True`` (the recipe's settings), ``False`` (off) or ``None`` (the recipe's choice). Keeps a
        dense stream even without ``dense_target``.
    :param checkpoint_dir: save progress after every block there (see :mod:`alpsprune.checkpoint`).
    :param resume: continue from the last completed block in ``checkpoint_dir``.
    :param parallel: distributed context (see :mod:`alpsprune.parallel`); default single process.
    :param solver_opts: method options, e.g. ``dampening_frac=0.01``, ``pcg_steps=10``.
    :returns: a :class:`PruneReport` (per layer: name, shape, achieved sparsity, error, seconds, info).
    """
    start = time.perf_counter()
    try:
        spec = SparsitySpec.parse(sparsity, mask_structure)
    except ValueError as exc:
        raise TargetError(str(exc)) from None
    sequential, dense_target, allocation = resolve_recipe(
        method,
        spec,
        faithful=faithful,
        sequential=sequential,
        dense_target=dense_target,
        allocation=allocation,
    )
    reconstruction = resolve_reconstruction(method, spec, reconstruction, faithful=faithful)
    allocation_mode = allocation if isinstance(allocation, str) else "custom"
    plan_options = dict(
        method=method, sparsity=sparsity, mask_structure=mask_structure, targets=targets, ignore=ignore
    )
    custom = allocation if allocation_mode == "custom" else None
    plan = plan_pruning(model, allocation=custom, **plan_options, **solver_opts)
    device = resolve_device(device)
    parallel = parallel or single_process()
    _check_calibration(calibration, model)
    placement = Placement.make(device, offload_activations, offload_dir)
    if allocation_mode in ("owl", "curve", "evo"):  # validated above; now the (slow) allocation pass
        allocation = allocate(
            allocation_mode,
            model,
            calibration,
            spec.sparsity,
            method=method,
            targets=targets,
            ignore=ignore,
            device=device,
            progress=progress and parallel.is_main,
            batch_size=batch_size,
            offload_activations=placement.place,
            offload_dir=offload_dir,
            parallel=parallel,
            **solver_opts,
        )
        plan = plan_pruning(model, allocation=allocation, **plan_options, **solver_opts)
    settings = {
        "method": method,
        **spec.to_dict(),
        "targets": targets,
        "ignore": ignore,
        "sequential": sequential,
        "dense_target": dense_target,
        "allocation": allocation_mode,
        "reconstruction": reconstruction.to_dict() if reconstruction is not None else None,
        "nsamples": int(calibration.shape[0]),
        "seqlen": int(calibration.shape[1]),
        "batch_size": batch_size,
        "device": str(device),
        "world_size": parallel.world_size,
        "solver_options": solver_opts,
    }
    report = PruneReport(settings=settings)

    from .checkpoint import Checkpointer  # local: keeps import light

    ckpt = Checkpointer(checkpoint_dir, settings, calibration, model) if checkpoint_dir else None
    my_samples = parallel.shard(calibration, batch_size)  # data parallel: each rank its batches
    with torch.no_grad():
        inputs = capture_stream(model, my_samples, placement, batch_size=batch_size)
    hidden: ActivationStream = inputs.hidden
    # the dense model's hidden states: targets of the layers (dense_target) and/or of each block
    dense_stream = hidden.share() if dense_target or reconstruction is not None else None
    first_block = 0
    if resume:
        first_block, hidden, dense_stream, report = _resume(
            checkpoint_dir,
            settings,
            calibration,
            plan,
            parallel,
            placement,
            release_blocks,
            model,
            batch_size,
        )
        inputs.hidden = hidden

    _note_unprunable(model, report, parallel)
    n_blocks = len(plan.blocks)
    bar = tqdm(
        total=n_blocks,
        initial=first_block,
        desc="pruning",
        unit="block",
        disable=not (progress and parallel.is_main),
    )
    try:
        for index in range(first_block, n_blocks):
            t_block = time.perf_counter()
            with visiting(plan.blocks[index], device, release=release_blocks) as block:
                records, calib_seconds, rec = _prune_block(
                    index,
                    block,
                    plan,
                    hidden,
                    dense_stream,
                    inputs,
                    placement,
                    sequential,
                    parallel,
                    bar,
                    replay_memory,
                    dense_target,
                    reconstruction,
                )
            report.layers.extend(records)
            report.blocks.append(
                {
                    "index": index,
                    "seconds": time.perf_counter() - t_block,
                    "calibration_seconds": calib_seconds,
                    **({"reconstruction": rec} if rec else {}),
                }
            )
            if parallel.is_main:
                errs = ", ".join(f"{r.name.rsplit('.', 1)[-1]} {r.error:.3e}" for r in records)
                log.info("block %d/%d (%.1f s): %s", index + 1, n_blocks, report.blocks[-1]["seconds"], errs)
            if ckpt is not None:
                weights = block_weights(plan, index, whole=reconstruction is not None)
                ckpt.save(index, weights, hidden, dense_stream, report, parallel)
            bar.update(1)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start + report.extra.pop("resumed_seconds", 0.0)
    report.model_sparsity = model_sparsity(model)
    return report


def _prune_block(
    index,
    block,
    plan,
    hidden,
    dense_stream,
    inputs,
    placement,
    sequential,
    parallel,
    bar,
    replay_memory,
    dense_target,
    reconstruction,
) -> tuple[list[LayerRecord], float, dict]:
    """Prune one block (on the device) and advance both streams past it, in place."""
    layers = plan.layers[index]
    device = placement.device

    def kwargs_of(batch: int) -> dict:
        return inputs.kwargs_for(index, batch)

    if not layers:  # nothing targeted in this block: just propagate
        propagate(block, hidden, kwargs_of)
        if dense_stream is not None:
            propagate(block, dense_stream, kwargs_of)
        return [], 0.0, {}
    t0 = time.perf_counter()
    # the dense stream's targets for the layers (dense_target) or only for the whole block
    # (reconstruction alone): then it moves past the still-dense block now, in one pass
    targets = dense_stream
    if dense_stream is not None and not dense_target:
        propagate(block, dense_stream, kwargs_of)
        targets = None
    # later passes over the pruned stream may skip the parts of the block that are already final
    replay = BlockReplay(block, layers, device, placement.store, budget=replay_memory)
    with torch.no_grad():
        groups = input_groups(block, layers, hidden.fetch(0), kwargs_of(0), replay)
    stages = [groups] if sequential == "block" else [[g] for g in groups]
    dense_weights = dense_inputs = None
    if targets is not None:
        # store the dense layer inputs (one dense pass) when the replay budget has room for them,
        # else recompute them stage by stage from the dense stream (nothing outlives a batch)
        need = dense_input_bytes(layers, groups, targets)
        if replay_memory is None or need <= replay_memory:
            leaders = {g[0]: layers[g[0]] for g in groups}
            with torch.no_grad():
                dense_inputs = store_dense_inputs(block, leaders, targets, kwargs_of, placement.store)
            replay.budget = None if replay_memory is None else replay_memory - need
        else:
            dense_weights = DenseWeights()
    calib_seconds = time.perf_counter() - t0
    records: list[LayerRecord] = []
    pruned: set[str] = set()
    for number, stage in enumerate(stages):
        last = number == len(stages) - 1
        t0 = time.perf_counter()
        with replay.reusing(pruned, len(hidden)):
            grams = collect_grams(
                block,
                layers,
                stage,
                hidden,
                kwargs_of,
                device,
                targets if dense_inputs is None else None,
                replay,
                dense_weights,
                advance_dense=last and dense_inputs is None,
                dense_inputs=dense_inputs,
            )
        parallel.all_reduce_grams(grams)
        calib_seconds += time.perf_counter() - t0
        tasks = [(name, leader) for group in stage for leader in [group[0]] for name in group]
        remaining = {group[0]: len(group) for group in stage}

        def solve(
            name: str, leader: str, grams: dict[str, Gram] = grams, remaining: dict = remaining
        ) -> tuple:
            solved = _solve_layer(name, layers[name], grams[leader], plan, index, device, bar)
            remaining[leader] -= 1
            if not remaining[leader]:  # the group's factorisation is no longer needed (memory plan)
                grams[leader].free()
            return solved

        results = parallel.solve(tasks, solve, like=lambda name: get_weight(layers[name]))
        for name, _ in tasks:
            weight, record = results[name]
            if dense_weights is not None and not last:  # later dense passes still need it
                dense_weights.keep(layers[name])
            set_weight(layers[name], weight)
            records.append(record)
            pruned.add(name)
        for gram in grams.values():
            gram.free()
        del grams, results
    del dense_weights
    rec: dict = {}
    if reconstruction is not None:
        t0 = time.perf_counter()
        replay.clear()  # the finished parts' recorded outputs are stale once the weights move
        pruned = set()
        masks = {layers[name].weight: layers[name].weight.data != 0 for name in layers}
        rec = reconstruct_block(
            block, masks, hidden, dense_stream, kwargs_of, reconstruction, index, parallel
        )
        rec["seconds"] = time.perf_counter() - t0

    def check(batch: int, out: torch.Tensor) -> None:
        if not bool(torch.isfinite(out).all()):
            raise SolverError(
                f"block {index} ({plan.blocks_path}.{index}) produced NaN/Inf outputs after pruning"
            )

    def before(batch: int) -> None:
        replay.batch = batch

    t0 = time.perf_counter()
    with replay.reusing(pruned, len(hidden), record=False):
        propagate(block, hidden, kwargs_of, before=before, check=check)
    replay.clear()
    calib_seconds += time.perf_counter() - t0
    return records, calib_seconds, rec


def _solve_layer(name, module, gram, plan, index, device, bar) -> tuple[torch.Tensor, LayerRecord]:
    """Solve one layer; name the layer in every failure; fall back to CPU on device OOM."""
    bar.set_postfix_str(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] if "." in name else name)
    if gram.has_nonfinite():
        raise SolverError(
            f"{name}: its calibration inputs contain NaN/Inf (block {index}); the model or dtype overflows — try --dtype float32"
        )
    spec = plan.specs[name]
    weight = get_weight(module).to(device)
    if not bool(torch.isfinite(weight).all()):
        raise SolverError(f"{name}: the weight contains NaN/Inf before pruning")
    try:
        try:
            result = prune_layer(weight, gram, plan.method, **spec.as_kwargs(), **plan.options)
        except torch.OutOfMemoryError:
            log.warning("%s: out of memory on %s; solving this layer on the CPU instead", name, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result = prune_layer(
                weight.cpu(), gram.to("cpu"), plan.method, **spec.as_kwargs(), **plan.options
            )
            result.info["cpu_fallback"] = True
    except (SolverError, AlpsPruneError):
        raise
    except Exception as exc:  # anything else: say which layer and why
        raise SolverError(f"{name}: {plan.method} failed: {type(exc).__name__}: {exc}") from exc
    pruned = result.weight
    record = LayerRecord(
        name=name,
        block=index,
        shape=tuple(pruned.shape),
        method=plan.method,
        pattern=spec.label,
        sparsity=float((pruned == 0).sum()) / pruned.numel(),
        error=result.error,
        seconds=result.info.get("seconds", 0.0),
        info={k: v for k, v in result.info.items() if k not in ("support_changes", "seconds")},
    )
    return pruned, record


def block_weights(plan: PrunePlan, index: int, whole: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a finished block: its target linears' weights by module name, and
    with ``whole`` (reconstruction moves them too) every other parameter by its full name."""
    layers = plan.layers[index]
    weights = {name: get_weight(module) for name, module in layers.items()}
    if whole:
        targets = {f"{name}.weight" for name in layers}
        prefix = f"{plan.blocks_path}.{index}."
        for name, param in plan.blocks[index].named_parameters():
            if prefix + name not in targets:
                weights[prefix + name] = param.data
    return weights


def _check_calibration(calibration: torch.Tensor, model: nn.Module) -> None:
    from .errors import DataError

    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise DataError("calibration must be a LongTensor of token ids with shape (nsamples, seqlen)")
    if calibration.numel() == 0:
        raise DataError("calibration is empty; give at least one window of token ids")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(calibration.max()) >= vocab or int(calibration.min()) < 0):
        raise DataError(
            f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary); got "
            f"[{int(calibration.min())}, {int(calibration.max())}] — was it tokenized with another tokenizer?"
        )


def _resume(
    checkpoint_dir, settings, calibration, plan, parallel, placement, release_blocks, model, batch_size
):
    from .checkpoint import load_checkpoint

    # the model's identity is checked before any pruned weight is written into it
    state = load_checkpoint(checkpoint_dir, settings, calibration, model, parallel, batch_size)
    for index in range(state.next_block):
        if release_blocks:  # finished blocks are not needed here: free them instead of loading them
            plan.blocks[index].to("meta")
            continue
        params = dict(plan.blocks[index].named_parameters())
        prefix = f"{plan.blocks_path}.{index}."
        for name, weight in state.weights_for(index).items():
            if name in plan.layers[index]:
                set_weight(plan.layers[index][name], weight)
            else:  # a parameter reconstruction moved (see block_weights)
                params[name.removeprefix(prefix)].data.copy_(weight)
    # this rank's windows, in its batches (the checkpoint re-batches and re-shards)
    hidden = ActivationStream(state.hidden, placement)
    dense = ActivationStream(state.dense, placement) if state.dense is not None else None
    report = state.report
    report.extra["resumed_seconds"] = report.seconds
    log.info("resuming at block %d/%d from %s", state.next_block + 1, len(plan.blocks), checkpoint_dir)
    return state.next_block, hidden, dense, report


def _note_unprunable(model: nn.Module, report: PruneReport, parallel: Parallel) -> None:
    """Say which weights stay dense because they are not linear layers (fused MoE experts), once, and record it."""
    from .models.discovery import unprunable_parameters

    skipped = unprunable_parameters(model)
    if skipped is None:
        return
    report.extra["not_pruned"] = skipped
    if parallel.is_main:
        log.warning(
            "not pruned: %s in every block (%.0f%% of the block weights): %s",
            ", ".join(skipped["kinds"]),
            100 * skipped["fraction_of_block_weights"],
            skipped["reason"],
        )


def model_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all parameters of the model (released ones, on the
    ``meta`` device, are left out)."""
    zeros = total = 0
    for p in model.parameters():
        if p.device.type == "meta":
            continue
        zeros += int((p == 0).sum())
        total += p.numel()
    return zeros / total if total else 0.0
