"""Shared command-line plumbing: argument groups, defaults, validation, logging, output folders."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import re
import sys
from pathlib import Path

from ..errors import AlpsPruneError, DeviceError, OutputError
from ..sparsity import DEFAULT_SPARSITY

log = logging.getLogger("alpsprune")

# Settings of the embedded default (no MODEL): finishes in a few minutes on 2 CPU cores.
DEMO_NSAMPLES, DEMO_SEQLEN = 32, 512
DEMO_EVAL_WINDOWS = 40  # held-out windows of DEMO_SEQLEN tokens scored per model
# The papers' standard recipe, used when a MODEL is given.
STANDARD_NSAMPLES, STANDARD_SEQLEN = 128, 2048
METHODS = ("alps", "sparsegpt", "wanda", "magnitude", "dsnot")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(AlpsPruneError):
    """A bad command-line argument (exit code 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``alpsprune prune: error: ... (see --help)`` and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once, as ``(default: X)``.

    Nothing is appended when the help text already states the default (recipe-dependent options say
    ``(default: recipe ...)``) or when there is no default to show (``None``, ``False``, ``[]``) —
    argparse's ArgumentDefaultsHelpFormatter printed "(default 0.6) (default: None)" there.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings or action.nargs in ("?", "*")
        if "default" in text or not shown or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def add_model_arg(p: argparse.ArgumentParser, optional: bool = True) -> None:
    p.add_argument(
        "model",
        nargs="?" if optional else None,
        default=None,
        help="Hugging Face model id, local model folder, or .gguf file"
        + ("; omitted: the bundled SmolLM2-135M-Instruct" if optional else ""),
    )


def add_pruning_args(p: argparse.ArgumentParser, single: bool = True) -> None:
    g = p.add_argument_group("pruning")
    if single:
        g.add_argument("--method", choices=METHODS, default="alps", help="layer solver")
        g.add_argument(
            "--sparsity",
            type=float,
            default=None,
            help=f"fraction of weights removed per layer (default: {DEFAULT_SPARSITY} unless --mask-structure "
            "is given)",
        )
        g.add_argument(
            "--mask-structure",
            default=None,
            metavar="N:M",
            help="N:M pattern, N KEPT in every M consecutive inputs (2:4); may be combined with the "
            "--sparsity it implies (0.5 with 2:4); 0:0 = unstructured",
        )
    g.add_argument(
        "--targets",
        action="append",
        metavar="REGEX",
        help="prune only linears whose full name matches (repeatable)",
    )
    g.add_argument(
        "--ignore", action="append", metavar="REGEX", help="skip linears whose full name matches (repeatable)"
    )
    g.add_argument(
        "--faithful",
        action="store_true",
        help="the paper's pipeline exactly: --sequential block, no dense target, uniform sparsity",
    )
    g.add_argument(
        "--sequential",
        choices=("block", "sublayer"),
        default=None,
        help="block: grams of a block from the dense block (paper); sublayer: re-collect after earlier "
        "layers are pruned (default: recipe; sublayer whenever the dense target is on)",
    )
    g.add_argument(
        "--dense-target",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit layers to the dense model's outputs (error correction) (default: recipe; on for "
        "sparsegpt, and for alps at unstructured sparsity above 60%%)",
    )
    g.add_argument(
        "--allocation",
        choices=("uniform", "owl", "curve", "evo"),
        default=None,
        help="per-layer sparsity at the same overall sparsity: uniform, OWL outlier ratio, measured "
        "error curves, or evo (searched per block, KL to the dense model; seeded, slower) "
        "(default: recipe; owl for alps at unstructured sparsity above 60%%, else uniform)",
    )
    g.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after each block's layers are solved, train its kept weights (masks fixed) towards the "
        "dense block's outputs with Adam (default: recipe; on for alps)",
    )
    g.add_argument(
        "--reconstruct-epochs",
        type=int,
        default=None,
        metavar="N",
        help="passes over the calibration batches per block (default: recipe; alps: 4 above 60%% "
        "unstructured sparsity, else 2; implies --reconstruct)",
    )
    g.add_argument(
        "--reconstruct-lr",
        type=float,
        default=None,
        metavar="LR",
        help="Adam learning rate, cosine-decayed per block (default 3e-3; implies --reconstruct)",
    )
    g.add_argument(
        "--reconstruct-loss",
        choices=("mse", "token"),
        default=None,
        help="mse: plain block-output error; token: each token's error relative to its dense RMS, "
        "as the next RMSNorm sees it (default token; implies --reconstruct)",
    )
    g.add_argument(
        "--dampening-frac",
        type=float,
        default=None,
        help="λ = frac · mean(diag G) (default: the solver's, 0.01)",
    )
    g.add_argument(
        "--solver-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra solver option, e.g. pcg_steps=20 (repeatable)",
    )
    c = p.add_argument_group("calibration")
    c.add_argument(
        "--calib",
        default="wiki-excerpt",
        help="wiki-excerpt | c4 | wikitext2 | ptb | hf:NAME[:CONFIG] | PATH",
    )
    c.add_argument("--calib-split", default=None, help="split of --calib (default: its calibration split)")
    c.add_argument("--text-field", default="text", help="text column of HF / jsonl / parquet sources")
    c.add_argument(
        "--nsamples",
        type=int,
        default=None,
        help="calibration windows (default: 32 for the bundled model, 128 otherwise)",
    )
    c.add_argument(
        "--seqlen",
        type=int,
        default=None,
        help="tokens per window (default: 512 for the bundled model, 2048 otherwise)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw")
    c.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward pass")


def add_loading_args(p: argparse.ArgumentParser, device_map: bool = False) -> None:
    """How the model is fetched: Hub revision, download cache, remote code; ``device_map``: the
    accelerate placement flags (``alpsprune eval`` only — pruning places blocks itself)."""
    g = p.add_argument_group("model loading")
    g.add_argument(
        "--revision", default=None, help="branch, tag or commit of a Hub model (default: the Hub's main)"
    )
    g.add_argument("--cache-dir", default=None, help="Hugging Face download cache (default: $HF_HOME/hub)")
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped in the model's repository (some architectures need it); only for "
        "repositories you trust",
    )
    if device_map:
        g.add_argument(
            "--device-map",
            default=None,
            help="accelerate device map: auto | balanced | sequential | cpu | cuda:N; spreads a model "
            "larger than one GPU over GPUs and CPU (default: the whole model on --device)",
        )
        g.add_argument(
            "--max-memory",
            default=None,
            metavar="DEV=SIZE,...",
            help="per-device memory for the device map, e.g. 0=20GiB,cpu=60GiB (implies --device-map auto)",
        )


def load_options(args) -> dict:
    """``load_model`` / ``load_tokenizer`` keywords from the loading flags (warns once on remote code)."""
    opts = {
        "trust_remote_code": bool(args.trust_remote_code),
        "revision": args.revision,
        "cache_dir": args.cache_dir,
    }
    if args.trust_remote_code:
        log.warning(
            "warning: --trust-remote-code runs Python code from the repository of %s with your permissions",
            args.model or "the model",
        )
    return opts


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=20GiB,cpu=60GiB"`` → ``{0: "20GiB", "cpu": "60GiB"}`` (accelerate's ``max_memory``)."""
    if text is None:
        return None
    out: dict[int | str, str] = {}
    for item in parse_list(text):
        key, sep, size = item.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not key or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", size, re.IGNORECASE):
            raise UsageError(f"--max-memory item {item!r}: expected DEVICE=SIZE such as 0=20GiB or cpu=60GiB")
        out[int(key) if key.isdigit() else key] = size
    if not out:
        raise UsageError("--max-memory is empty; give e.g. 0=20GiB,cpu=60GiB")
    return out


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the model in")
    r.add_argument(
        "--offload-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep calibration activations on the host (default: on the device when the memory plan "
        "says they fit in --max-memory, else on the host)",
    )
    r.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory the run may use on the compute device, e.g. 80GB (default: what the device has "
        "free; RAM on a CPU); a run that cannot fit even with offloaded activations stops before loading",
    )
    r.add_argument(
        "--threads",
        default=None,
        metavar="N",
        help="CPU threads for matmuls and factorisations: a number, or 'auto' (the cores not busy with "
        "other work); default: torch's setting (all cores, or $OMP_NUM_THREADS)",
    )


def add_eval_args(p: argparse.ArgumentParser, flag: str = "--eval") -> None:
    e = p.add_argument_group("evaluation")
    e.add_argument(
        flag,
        default=None,
        metavar="DATASETS",
        help="comma list of perplexity datasets (wiki-excerpt, wikitext2, ptb, c4, PATH); 'none' to skip "
        "(default: wiki-excerpt held-out articles)",
    )
    e.add_argument(
        "--max-windows", type=int, default=None, help="score at most this many windows per dataset"
    )
    e.add_argument(
        "--eval-seqlen", type=int, default=None, help="window length for perplexity (default: --seqlen)"
    )
    add_protocol_arg(e)


def add_protocol_arg(p) -> None:
    p.add_argument(
        "--ppl-protocol",
        choices=("auto", "papers", "bos"),
        default="auto",
        help="how perplexity windows are cut: 'papers' = the published stream (only the first window "
        "starts with BOS), 'bos' = BOS at the start of every window, 'auto' = 'bos' when the "
        "tokenizer adds BOS itself, else 'papers'",
    )


def add_verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only the final summary")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks on errors")


def setup_logging(args, rank: int = 0) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet or rank else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "fsspec", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def pipeline_options(args) -> dict:
    """The pipeline flags as ``prune_model`` / ``resolve_recipe`` keywords (``None``: the method's recipe)."""
    return {
        "faithful": args.faithful,
        "sequential": args.sequential,
        "dense_target": args.dense_target,
        "allocation": args.allocation,
        "reconstruction": reconstruction_option(args),
    }


def reconstruction_option(args):
    """``--reconstruct`` and its settings as ``prune_model``'s ``reconstruction`` (None: the recipe's)."""
    from ..reconstruct import Reconstruction

    tuned = {
        key: value
        for key, value in (
            ("epochs", args.reconstruct_epochs),
            ("lr", args.reconstruct_lr),
            ("loss", args.reconstruct_loss),
        )
        if value is not None
    }
    if args.reconstruct is False:
        if tuned:
            raise UsageError("--no-reconstruct cannot be combined with --reconstruct-epochs/-lr/-loss")
        return False
    if not tuned and args.reconstruct is None:
        return None  # the recipe decides
    try:
        return Reconstruction(**tuned, seed=getattr(args, "seed", 0) or 0)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).replace('reconstruction ', 'reconstruct-')}") from None


def parse_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def parse_solver_opts(args) -> dict:
    opts: dict = {}
    if getattr(args, "dampening_frac", None) is not None:
        if args.dampening_frac < 0:
            raise UsageError(f"--dampening-frac must be >= 0, got {args.dampening_frac}")
        opts["dampening_frac"] = args.dampening_frac
    for item in args.solver_opt:
        if "=" not in item:
            raise UsageError(f"--solver-opt expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        opts[key.strip()] = _literal(value.strip())
    return opts


def _literal(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def default_calib_shape(bundled: bool, nsamples: int | None, seqlen: int | None) -> tuple[int, int]:
    """Calibration windows × tokens: the given values, else the bundled demo's or the papers' defaults
    (shared by the CLI and :func:`alpsprune.oneshot`)."""
    # `is None`, not `or`: an explicit 0 is an error, not a request for the default.
    nsamples = nsamples if nsamples is not None else (DEMO_NSAMPLES if bundled else STANDARD_NSAMPLES)
    seqlen = seqlen if seqlen is not None else (DEMO_SEQLEN if bundled else STANDARD_SEQLEN)
    return nsamples, seqlen


def calib_shape(args) -> tuple[int, int]:
    nsamples, seqlen = default_calib_shape(args.model is None, args.nsamples, args.seqlen)
    if nsamples < 1:
        raise UsageError(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen < 8:
        raise UsageError(f"--seqlen must be at least 8 tokens, got {seqlen}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    return nsamples, seqlen


def eval_settings(args) -> tuple[list[str], int | None, int | None]:
    """Datasets, window length and window cap for perplexity."""
    datasets = (
        ["wiki-excerpt"] if args.eval is None else [d for d in parse_list(args.eval) if d.lower() != "none"]
    )
    seqlen = (
        args.eval_seqlen
        or getattr(args, "seqlen", None)
        or (DEMO_SEQLEN if args.model is None else STANDARD_SEQLEN)
    )
    max_windows = args.max_windows
    if max_windows is None and args.model is None:
        max_windows = DEMO_EVAL_WINDOWS
    return datasets, seqlen, max_windows


def check_device(device: str) -> None:
    from ..pipeline import resolve_device

    resolve_device(device)


def check_dtype(dtype: str, device: str) -> None:
    from ..pipeline import resolve_device

    if dtype not in DTYPES:
        raise DeviceError(f"unsupported --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "float16" and resolve_device(device).type == "cpu":
        raise DeviceError("--dtype float16 is not supported for CPU pruning; use float32 or bfloat16 on CPU")


def check_regexes(targets: list[str] | None, ignore: list[str] | None) -> None:
    """Invalid --targets/--ignore regexes are a TargetError before anything is loaded."""
    from ..models.discovery import _compile

    _compile(targets, "targets")
    _compile(ignore, "ignore")


def check_solver_opts(method: str, opts: dict) -> None:
    """Unknown --solver-opt keys fail before the model is loaded (the pipeline checks again)."""
    from ..solvers import solver_options

    allowed = solver_options(method)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise UsageError(
            f"unknown solver option(s) {', '.join(unknown)} for --method {method}; valid: {', '.join(allowed) or 'none'}"
        )


def check_model_arg(model: str | None) -> None:
    """Fail fast on a local path that does not exist (Hub ids are checked when loading)."""
    if model is None:
        return
    looks_local = (
        model.startswith((".", "/", "~"))
        or model.endswith(".gguf")
        or os.sep in model
        and Path(model).parent.exists()
    )
    path = Path(model).expanduser()
    if looks_local and not path.exists():
        from ..errors import ModelError

        raise ModelError(
            f"model path {model!r} does not exist; give a local model folder, a .gguf file or a Hub id"
        )


def default_output(args, label: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = (
        "smollm2-135m"
        if args.model is None
        else re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name or args.model)
    )
    return Path("runs") / f"{stamp}-{name}-{label}"


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before anything heavy, an output folder alpsprune must not write into (see
    :func:`alpsprune.io.check_output_folder`: foreign files, `.`, `/`, home, a complete run without
    --overwrite), or one whose parent is not writable."""
    from ..io import check_output_folder

    check_output_folder(path, overwrite, flag="--output")
    parent = path.expanduser().absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write into {parent}; choose another --output")


EVAL_MARK = "alpsprune eval"  # `written_by` of the JSON files `alpsprune eval` writes


def check_output_file(path: Path) -> None:
    """`eval --output FILE`: a new file, or one that `alpsprune eval` wrote before (by its mark)."""
    import json

    if path.is_dir():
        raise OutputError(f"--output {path} is a folder; give a file name, e.g. --output {path}/eval.json")
    if path.exists() or path.is_symlink():
        try:
            ours = json.loads(path.read_text()).get("written_by") == EVAL_MARK
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputError(
                f"--output {path} exists and was not written by alpsprune eval; choose another --output"
            )


def parse_threads(value: str | None) -> int | None:
    """``--threads``: ``None`` (torch's setting), ``auto`` (:func:`alpsprune.stats.machine_threads`) or N ≥ 1."""
    if value is None:
        return None
    if str(value).lower() == "auto":
        from ..stats import machine_threads

        return machine_threads()
    try:
        threads = int(value)
    except ValueError:
        raise UsageError(f"--threads must be a positive integer or 'auto', got {value!r}") from None
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    return threads
