"""``alpsprune prune``: load, calibrate, evaluate dense, prune, evaluate pruned, save — one command."""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
import time
from pathlib import Path

from ..errors import AlpsPruneError, CheckpointError, OutputError
from ..sparsity import SparsitySpec
from .common import (
    DEFAULT_SPARSITY,
    DEMO_EVAL_WINDOWS,
    DEMO_NSAMPLES,
    DEMO_SEQLEN,
    DTYPES,
    HelpFormatter,
    UsageError,
    add_eval_args,
    add_loading_args,
    add_model_arg,
    add_pruning_args,
    add_runtime_args,
    add_verbosity,
    calib_shape,
    check_device,
    check_dtype,
    check_model_arg,
    check_output,
    check_regexes,
    check_solver_opts,
    default_output,
    eval_settings,
    load_options,
    parse_solver_opts,
    pipeline_options,
    reconstruction_option,
    setup_logging,
)

log = logging.getLogger("alpsprune")

EXAMPLES = f"""
examples:
  alpsprune prune                                   # bundled SmolLM2-135M, ALPS at {DEFAULT_SPARSITY:.0%}, wiki-excerpt
  alpsprune prune --method sparsegpt --mask-structure 2:4
  alpsprune prune meta-llama/Llama-3.1-8B --sparsity 0.7 --calib c4 --eval wikitext2,c4 --device cuda
  alpsprune prune ./my-model --targets 'mlp\\.' --ignore down_proj --output runs/mlp-only
  alpsprune prune ./my-model --sparsity 0.7 --output runs/x --resume   # continue a killed run
  torchrun --nproc-per-node 4 -m alpsprune prune ./my-model --sparsity 0.7

Without MODEL the bundled SmolLM2-135M-Instruct is pruned with {DEMO_NSAMPLES}×{DEMO_SEQLEN} calibration
tokens from the Wikipedia excerpt and evaluated on {DEMO_EVAL_WINDOWS} held-out windows of {DEMO_SEQLEN}
tokens (a few minutes on 2 CPU cores). With a MODEL the defaults are the papers' 128×2048.
N:M counts KEPT weights: 2:4 keeps 2 of every 4 consecutive inputs of each row.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model, evaluate it and save it",
        description="Prune every linear layer inside the decoder blocks of a causal LM, one block at a time.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_model_arg(p)
    add_loading_args(p)
    add_pruning_args(p)
    add_runtime_args(p)
    add_eval_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan (peak device/host memory per phase) and a time estimate from the "
        "config alone, then exit; MODEL may also be a config.json or a built-in name (llama-2-7b, "
        "llama-3-8b, llama-3-70b)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, help="output folder (default: a new folder under ./runs/)")
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous alpsprune output (only the files its manifest lists), or restart an "
        "unfinished run; a folder holding other files is always refused",
    )
    o.add_argument(
        "--save-dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the saved weights; auto: the one the model declares (config.json dtype; bfloat16 for "
        "a quantized GGUF). The pruned perplexity is measured on the weights rounded to it",
    )
    o.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="upload the output folder to this Hugging Face Hub model repository (USER/NAME), created if needed",
    )
    o.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    o.add_argument(
        "--checkpoint-dir", default=None, help="where per-block checkpoints go (default: OUTPUT/checkpoint)"
    )
    o.add_argument(
        "--resume", action="store_true", help="continue from the last completed block of the checkpoint"
    )
    add_verbosity(p)
    p.set_defaults(func=run)


def resolve_spec(args) -> SparsitySpec:
    sparsity = args.sparsity if args.sparsity is not None or args.mask_structure else DEFAULT_SPARSITY
    try:
        return SparsitySpec.parse(sparsity, args.mask_structure)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args) -> int:
    from ..parallel import default_device, init_from_env

    parallel = init_from_env()
    setup_logging(args, parallel.rank)
    t_start = time.perf_counter()

    # ---- cheap validation, before anything heavy --------------------------------------------------
    spec = resolve_spec(args)
    nsamples, seqlen = calib_shape(args)
    solver_opts = parse_solver_opts(args)
    check_solver_opts(args.method, solver_opts)
    from ..pipeline import resolve_recipe

    # contradictions (--faithful with --dense-target, owl with N:M) fail here, not after loading
    sequential, dense_target, _ = resolve_recipe(args.method, spec, **pipeline_options(args))
    check_regexes(args.targets, args.ignore)
    device = default_device(parallel) if args.device == "auto" else args.device
    if not (args.dry_run and str(device).startswith("cuda")):  # a GPU can be planned for without one
        check_device(device)
        check_dtype(args.dtype, device)
    run_plan = memory_plan(args, nsamples, seqlen, device, parallel.world_size, sequential, dense_target)
    if args.dry_run:
        print(run_plan.describe())
        return 0
    check_model_arg(args.model)
    if run_plan is not None and run_plan.placement is None:
        raise AlpsPruneError(run_plan.refusal())
    offload = args.offload_activations
    if offload is None:
        offload = run_plan is not None and run_plan.placement == "host"
    replay_memory = replay_budget(run_plan, offload)
    load = load_options(args)
    datasets, eval_seqlen, max_windows = eval_settings(args)
    from ..data import check_disjoint, resolve_source

    resolve_source(args.calib)
    for ds in datasets:
        resolve_source(ds)
        check_disjoint(args.calib, args.calib_split, ds, None)
    if args.push_to_hub:
        from ..hub import check_push_target

        check_push_target(args.push_to_hub)
    elif args.private:
        raise UsageError("--private only applies with --push-to-hub REPO")
    label = f"{args.method}-{spec.label.replace(':', 'of')}"
    out, ckpt_dir = run_folders(args, label, parallel)

    # ---- structure, calibration, then the weights (the slow part) last --------------------------------
    from ..data import assert_no_window_overlap, eval_windows, get_calibration, resolve_protocol
    from ..io import load_model, load_tokenizer, model_skeleton
    from ..pipeline import plan_pruning, prune_model

    def plan(m):
        p = plan_pruning(
            m, method=args.method, **spec.as_kwargs(), targets=args.targets, ignore=args.ignore, **solver_opts
        )
        return len(p.layer_names), len(p.blocks)

    skeleton = model_skeleton(args.model, **load)  # config only, on the meta device: no weights read
    if skeleton is not None:
        plan(skeleton)
        del skeleton
    log.info("calibration: %d × %d tokens from %s (seed %d)", nsamples, seqlen, args.calib, args.seed)
    calibration = get_calibration(
        args.calib,
        load_tokenizer(args.model, **load),
        nsamples,
        seqlen,
        args.seed,
        split=args.calib_split,
        text_field=args.text_field,
    )

    log.info("loading %s", args.model or "bundled SmolLM2-135M-Instruct")
    # ranks other than 0 load the checkpoint's own dtype (memory-mapped, not resident) and cast one block
    # at a time when it visits; rank 0, which evaluates and saves, loads --dtype (Parallel.align_model)
    lean_rank = parallel.world_size > 1 and not parallel.is_main
    model, tokenizer = load_model(args.model, dtype="auto" if lean_rank else args.dtype, **load)
    parallel.align_model(model)
    n_layers, n_blocks = plan(model)
    log.info(
        "targets: %d linear layers in %d blocks (targets=%s, ignore=%s)",
        n_layers,
        n_blocks,
        args.targets,
        args.ignore,
    )
    eval_data = {}
    if parallel.is_main:
        for ds in datasets:
            eval_data[ds] = eval_windows(ds, tokenizer, eval_seqlen, protocol=args.ppl_protocol)
            assert_no_window_overlap(calibration, eval_data[ds])

    # ---- dense evaluation (rank 0), reused on resume when the model and evaluation are the same --------
    dense_ppl: dict = {}
    if parallel.is_main and datasets:
        from ..checkpoint import load_dense_eval, save_dense_eval

        key = dense_eval_key(model, eval_data, eval_seqlen, max_windows, args.dtype)
        reused = load_dense_eval(ckpt_dir, key) if args.resume else None
        dense_ppl = reused or evaluate(
            model, tokenizer, eval_data, eval_seqlen, max_windows, device, args.quiet
        )
        if reused is None:
            save_dense_eval(ckpt_dir, key, dense_ppl)

    # ---- prune ------------------------------------------------------------------------------------
    report = prune_model(
        model,
        calibration,
        method=args.method,
        **spec.as_kwargs(),
        targets=args.targets,
        ignore=args.ignore,
        device=device,
        **pipeline_options(args),
        offload_activations=offload,
        replay_memory=replay_memory,
        batch_size=args.batch_size,
        progress=not args.quiet,
        checkpoint_dir=ckpt_dir,
        resume=args.resume,
        parallel=parallel,
        release_blocks=not parallel.is_main,  # rank 0 alone keeps, evaluates and saves the model
        **solver_opts,
    )
    report.settings.update(
        {
            "model": args.model or "bundled:SmolLM2-135M-Instruct",
            "calib": args.calib,
            "calib_split": args.calib_split,
            "seed": args.seed,
        }
    )
    if not parallel.is_main:
        parallel.barrier()
        return 0

    # ---- pruned evaluation, outputs ----------------------------------------------------------------
    round_for_saving(model, args.save_dtype, report.settings)
    pruned_ppl = (
        evaluate(model, tokenizer, eval_data, eval_seqlen, max_windows, device, args.quiet)
        if datasets
        else {}
    )
    report.extra["perplexity"] = {
        "dense": dense_ppl,
        "pruned": pruned_ppl,
        "seqlen": eval_seqlen,
        "max_windows": max_windows,
        "protocol": resolve_protocol(tokenizer, args.ppl_protocol),  # how the windows were cut
    }
    report.extra["total_seconds"] = time.perf_counter() - t_start
    write_outputs(model, tokenizer, report, out, args, ckpt_dir)
    if args.push_to_hub:
        from ..hub import push_folder

        report.extra["hub_url"] = push_folder(out, args.push_to_hub, private=args.private or None)
    print(summary(report, out))
    parallel.barrier()
    return 0


def round_for_saving(model, save_dtype: str, settings: dict) -> None:
    """Round the pruned weights to the dtype they will be saved in, so the pruned perplexity is that of the
    saved model (loaded back in the dtype it was evaluated in, its weights are bit-identical)."""
    from ..io import resolve_save_dtype, round_to_dtype

    dtype = resolve_save_dtype(model, save_dtype)
    settings["save_dtype"] = str(dtype).removeprefix("torch.")
    if round_to_dtype(model, dtype):
        log.info("weights rounded to %s, the saved dtype (--save-dtype)", settings["save_dtype"])


def replay_budget(run_plan, offload) -> int:
    """Bytes the replay cache may use: half the headroom the plan leaves on the device that holds the
    activations, so sub-layer passes replay finished parts (fewer forwards, bit-identical results) when
    memory allows and nothing outlives a batch when it does not (0 without a plan or when offloaded)."""
    if run_plan is None or run_plan.budget is None or offload or run_plan.placement != "device":
        return 0
    return max(0, (run_plan.budget - run_plan.chosen.peak_device) // 2)


def reconstruct_epochs(args) -> int:
    """Epochs of the reconstruction this run will do (0: none), as the pipeline will resolve it."""
    from ..pipeline import resolve_reconstruction

    rec = resolve_reconstruction(
        args.method, resolve_spec(args), reconstruction_option(args), faithful=args.faithful
    )
    return rec.epochs if rec is not None else 0


def memory_plan(args, nsamples, seqlen, device, world_size, sequential, dense_target):
    """The memory plan of this run (config only), or ``None`` when a real run cannot read the config
    (the load reports that); ``--dry-run`` reports it here."""
    from ..memory import plan_cli_run
    from ..pipeline import resolve_device

    opts = parse_solver_opts(args)
    try:
        return plan_cli_run(
            args.model,
            method=args.method,
            sequential=sequential,
            dense_target=dense_target,
            nsamples=nsamples,
            seqlen=seqlen,
            batch_size=args.batch_size,
            dtype=args.dtype,
            world_size=world_size,
            device=str(device)
            if args.dry_run and str(device).startswith("cuda")
            else str(resolve_device(device)),
            max_memory=args.max_memory,
            offload=args.offload_activations,
            precision_bytes=8 if opts.get("precision") == "float64" else 4,
            eval_seqlen=args.eval_seqlen,
            reconstruct_epochs=reconstruct_epochs(args),
        )
    except ValueError as exc:  # a bad --max-memory, or an unreadable config
        if args.dry_run or not isinstance(exc, AlpsPruneError):
            raise UsageError(str(exc)) if not isinstance(exc, AlpsPruneError) else exc from None
        log.debug("no memory plan: %s", exc)
        return None


def evaluate(model, tokenizer, eval_data: dict, seqlen: int, max_windows, device, quiet: bool) -> dict:
    """Perplexity per dataset on the compute device: the model is moved there once if it fits,
    else each block visits the device once for all windows (like pruning), so any model that can
    be pruned can be scored."""
    from ..evaluation import perplexity
    from ..pipeline import resolve_device

    dev = resolve_device(device)
    results = {}
    for name, tokens in eval_data.items():
        if tokens.numel() < seqlen:
            raise AlpsPruneError(
                f"evaluation set {name!r} has {tokens.numel()} tokens, fewer than one window of {seqlen}"
            )
        r = perplexity(
            model,
            tokenizer,
            tokens,
            seqlen=seqlen,
            max_windows=max_windows,
            progress=not quiet,
            device=dev,
            offload="auto",
        )
        results[name] = {"ppl": r.ppl, "windows": r.windows, "seqlen": r.seqlen, "seconds": r.seconds}
        log.info("perplexity %s: %.3f (%d windows of %d)", name, r.ppl, r.windows, r.seqlen)
    return results


def report_markdown(report) -> str:
    from ..report import format_table

    s = report.settings
    lines = ["# alpsprune run", "", "## Settings", ""]
    lines += [
        format_table(
            ["setting", "value"], [[k, json.dumps(v, default=str)] for k, v in s.items()], markdown=True
        )
    ]
    ppl = report.extra.get("perplexity", {})
    if ppl.get("pruned") or ppl.get("dense"):
        lines += ["", "## Perplexity", ""]
        rows = []
        for name in sorted(set(ppl.get("dense", {})) | set(ppl.get("pruned", {}))):
            d = ppl.get("dense", {}).get(name, {})
            p = ppl.get("pruned", {}).get(name, {})
            rows.append(
                [
                    name,
                    f"{d.get('ppl', float('nan')):.3f}",
                    f"{p.get('ppl', float('nan')):.3f}",
                    str(p.get("windows", d.get("windows"))),
                    str(ppl.get("seqlen")),
                ]
            )
        lines += [format_table(["dataset", "dense", "pruned", "windows", "seqlen"], rows, markdown=True)]
    sm = report.summary
    lines += [
        "",
        "## Summary",
        "",
        f"- layers: {sm['layers']} in {sm['blocks']} blocks",
        f"- targeted sparsity: {sm['targeted_sparsity']:.4f}; whole model: {sm['model_sparsity']:.4f}",
        f"- mean relative error: {sm['mean_error']:.4e} (max {sm['max_error']:.4e})",
        f"- pruning time: {sm['seconds']:.1f} s; total: {report.extra.get('total_seconds', 0):.1f} s",
    ]
    skipped = report.extra.get("not_pruned")
    if skipped:  # e.g. fused MoE experts: say it where the numbers are read
        lines.append(
            f"- not pruned: {', '.join(skipped['kinds'])} in every block "
            f"({skipped['fraction_of_block_weights']:.0%} of the block weights): {skipped['reason']}"
        )
    lines += [
        "",
        "## Layers",
        "",
        report.table(markdown=True),
        "",
        "![per-layer error](layers.png)",
        "",
    ]
    return "\n".join(lines)


def write_outputs(model, tokenizer, report, out: Path, args, ckpt_dir: Path) -> None:
    """Everything built in a temporary folder, then moved in with the manifest last (see
    :func:`alpsprune.io.save_pruned`); then the checkpoint removes its own files."""
    from ..checkpoint import CheckpointFolder
    from ..io import save_pruned
    from ..modelcard import model_card
    from ..plots import plot_allocation, plot_layers

    with tempfile.TemporaryDirectory() as tmp:
        png = plot_layers(report, Path(tmp) / "layers.png")
        extra = {"report.md": report_markdown(report), "layers.png": png}
        if report.settings.get("allocation") != "uniform":  # per-layer sparsity: show the choice
            extra["allocation.png"] = plot_allocation(report, Path(tmp) / "allocation.png")
        extra["README.md"] = model_card(
            report,
            command=shlex.join(["alpsprune", *getattr(args, "argv", [])]),
            images=[name for name in extra if name.endswith(".png")],
            repo_id=args.push_to_hub,
        )
        try:
            save_pruned(
                model,
                tokenizer,
                out,
                report=report,
                settings=report.settings,
                overwrite=args.overwrite,
                extra_files=extra,
                save_dtype=report.settings["save_dtype"],
            )
        except OutputError as exc:  # e.g. files appeared in the folder meanwhile: the work is not lost
            raise OutputError(
                f"{exc}; every pruned block is kept in {ckpt_dir}: rerun with --resume"
            ) from None
    # finished: remove what the checkpointer wrote (by name), and its folder only if nothing else is in it
    CheckpointFolder(ckpt_dir).clean()


def run_folders(args, label: str, parallel) -> tuple[Path, Path]:
    """The output and checkpoint folders, checked before anything heavy: a folder holding files that
    alpsprune did not write is refused, `--overwrite` replaces only a previous alpsprune output or
    unfinished run, `--resume` needs an unfinished run (without `--output`: the one under ./runs/ that
    this command started)."""
    from ..checkpoint import check_checkpoint_folder, has_unfinished_run

    if args.output:
        out = Path(args.output)
    else:
        out = find_unfinished_run(args, label) if args.resume else default_output(args, label)
        if parallel.world_size > 1:  # every rank writes into the checkpoint: one time stamp for all
            import torch.distributed as dist

            box = [str(out)]
            dist.broadcast_object_list(box, src=0)
            out = Path(box[0])
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoint"
    check_output(out, args.overwrite)
    if args.checkpoint_dir:
        check_checkpoint_folder(ckpt_dir)
        o, c = out.expanduser().resolve(), ckpt_dir.expanduser().resolve()
        if c == o or c in o.parents:
            raise UsageError(
                f"--checkpoint-dir {ckpt_dir} would hold the output {out}; give it a folder of its own, "
                f"e.g. --checkpoint-dir {out / 'checkpoint'}"
            )
    unfinished = has_unfinished_run(ckpt_dir)
    if args.resume and not unfinished:
        raise CheckpointError(
            f"nothing to resume: no checkpoint (state.json) in {ckpt_dir}; run without --resume to start fresh"
        )
    if not args.resume and unfinished and not args.overwrite:
        raise OutputError(
            f"{ckpt_dir} holds the checkpoint of an unfinished run; pass --resume to continue it "
            "or --overwrite to start over"
        )
    return out, ckpt_dir


def find_unfinished_run(args, label: str) -> Path:
    """`prune --resume` without `--output`: the unfinished run of the same model and pattern under ./runs/."""
    if args.checkpoint_dir:
        raise UsageError("--resume with --checkpoint-dir also needs the --output of the run it continues")
    from ..checkpoint import has_unfinished_run

    pattern = default_output(args, label).name.split("-", 2)[2]  # drop the time stamp
    found = sorted(
        (p for p in Path("runs").glob(f"*-{pattern}") if has_unfinished_run(p / "checkpoint")),
        key=lambda p: p.name,
    )
    if not found:
        raise CheckpointError(
            f"nothing to resume: no unfinished run runs/*-{pattern}/ in the current folder; pass the --output "
            "of the run to continue, or run without --resume to start fresh"
        )
    if len(found) > 1:
        raise CheckpointError(
            f"{len(found)} unfinished runs match (runs/*-{pattern}/); pass the one to continue, e.g. "
            f"--output {found[-1]} (the latest)"
        )
    log.info("resuming the unfinished run in %s", found[0])
    return found[0]


def dense_eval_key(model, eval_data: dict, seqlen: int, max_windows, dtype: str) -> dict:
    """What the dense perplexities depend on: the model, the evaluation tokens and windows, the dtype."""
    import hashlib

    from ..checkpoint import model_identity

    tokens = {name: hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest() for name, t in eval_data.items()}
    return {
        "model": model_identity(model),
        "tokens": tokens,
        "seqlen": seqlen,
        "max_windows": max_windows,
        "dtype": dtype,
    }


def _is_faithful(settings: dict) -> bool:
    from ..pipeline import FAITHFUL

    same = all(settings.get(key) == value for key, value in FAITHFUL.items())
    return same and not settings.get("reconstruction")


def _reconstruction_text(settings: dict) -> str:
    rec = settings.get("reconstruction")
    if not rec:
        return ""
    return f", reconstruction={rec['epochs']} epochs at lr {rec['lr']:g} ({rec.get('loss', 'mse')} loss)"


def summary(report, out: Path) -> str:
    s = report.settings
    sm = report.summary
    pattern = s.get("mask_structure") or f"{s['sparsity']:.0%}"
    lines = [
        f"alpsprune: {s['method']} at {pattern} on {s.get('model')}: {sm['layers']} layers, targeted sparsity "
        f"{sm['targeted_sparsity']:.4f} (whole model {sm['model_sparsity']:.4f}), pruned in {sm['seconds']:.1f} s",
        f"  pipeline: sequential={s['sequential']}, dense_target={s['dense_target']}, "
        f"allocation={s['allocation']}{_reconstruction_text(s)}"
        + (" (the paper's, --faithful)" if _is_faithful(s) else ""),
    ]
    ppl = report.extra.get("perplexity", {})
    for name, p in ppl.get("pruned", {}).items():
        d = ppl.get("dense", {}).get(name, {}).get("ppl")
        dense = f"dense {d:.3f} -> " if d is not None else ""
        lines.append(
            f"  perplexity {name} ({p['windows']}×{p['seqlen']} tokens): {dense}pruned {p['ppl']:.3f}"
        )
    outputs = ("model.safetensors", "README.md", "report.json", "report.md", "layers.png", "allocation.png")
    shown = [f for f in outputs if (out / f).exists()]
    lines.append(f"  wrote {out}/ ({', '.join(shown)})")
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if weights:
        lines.append(f"  weights: {weights / 1e6:.1f} MB in {s.get('save_dtype', 'the model dtype')}")
    if report.extra.get("hub_url"):
        lines.append(f"  pushed to {report.extra['hub_url']}")
    return "\n".join(lines)
