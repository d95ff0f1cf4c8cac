"""Text sources for calibration and evaluation, all read through one function, :func:`load_text`.

Source names (``SOURCES`` lists them with their defaults):

* ``c4`` — ``allenai/c4`` ``en``: split ``train`` is shard 0 (``en/c4-train.00000-of-01024.json.gz``),
  ``validation`` is shard 0 of the validation set (``en/c4-validation.00000-of-00008.json.gz``).
* ``wikitext2`` — ``Salesforce/wikitext`` config ``wikitext-2-raw-v1`` (train / validation / test).
* ``ptb`` — ``ptb-text-only/ptb_text_only`` config ``penn_treebank``, text field ``sentence``.
* ``hf:<name>[:config]`` or a bare ``<name>[:config]`` that is not a local path — any dataset on the
  Hub, with ``split`` and ``text_field`` given by the caller.
* a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder of such files (searched
  recursively; one kind per folder). Read with ``datasets.load_dataset("text" | "json" | "parquet",
  data_files=...)`` — the same ``datasets`` code path as the Hub sources. ``.txt`` files are split
  into paragraphs at blank lines.
* ``wiki-excerpt`` / ``lee`` — real English text inside the gensim wheel (see ``wiki_excerpt``), split
  by document into ``train`` (calibration) and ``test`` parts.

Hub datasets are fetched by ``datasets``, which follows the standard Hugging Face settings:
``HF_ENDPOINT`` (a mirror), ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` (cache only) and the
``HTTPS_PROXY`` / ``HTTP_PROXY`` proxies. Before a download alpsprune asks once whether the Hub
answers, through ``huggingface_hub``'s own HTTP session (so the same endpoint, proxies and offline
flags apply); when it does not, the cache is read in offline mode and otherwise a
:class:`DataError` says what to use instead — nothing hangs on retries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .wiki_excerpt import load_gensim_text

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
LOCAL_EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
GENSIM_SOURCES = ("wiki-excerpt", "lee")


@dataclass(frozen=True)
class HubSpec:
    """A named dataset on the Hugging Face Hub and the splits the standard recipes use."""

    path: str
    name: str | None = None
    text_field: str = "text"
    data_files: dict[str, str] = field(default_factory=dict)  # split -> file inside the repo
    calib_split: str = "train"
    eval_split: str = "test"
    description: str = ""


HUB_SOURCES: dict[str, HubSpec] = {
    "c4": HubSpec(
        path="allenai/c4",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        eval_split="validation",
        description="C4 en; calibration: train shard 0, one window per document; perplexity: the "
        "first 1100 validation documents, first 256 windows",
    ),
    "wikitext2": HubSpec(
        path="Salesforce/wikitext",
        name="wikitext-2-raw-v1",
        description="WikiText-2 raw; calibration: train; perplexity: test",
    ),
    "ptb": HubSpec(
        path="ptb-text-only/ptb_text_only",
        name="penn_treebank",
        text_field="sentence",
        eval_split="validation",
        description="Penn Treebank (text only); calibration: train; perplexity: validation",
    ),
}

#: Every named source with its default calibration and evaluation split.
SOURCES: dict[str, dict[str, str | None]] = {
    **{
        k: {"calib_split": v.calib_split, "eval_split": v.eval_split, "about": v.description}
        for k, v in HUB_SOURCES.items()
    },
    "wiki-excerpt": {
        "calib_split": "train",
        "eval_split": "test",
        "about": "gensim's English Wikipedia excerpt (offline); articles i%4==3 are the test part",
    },
    "lee": {
        "calib_split": "train",
        "eval_split": "test",
        "about": "gensim's lee_background.cor news stories (offline); stories i%4==3 are the test part",
    },
    "hf:<name>[:config]": {"calib_split": "train", "eval_split": "test", "about": "any Hub dataset"},
    "<file or folder>": {"calib_split": None, "eval_split": None, "about": ".txt/.jsonl/.json/.parquet"},
}

DEFAULT_CALIBRATION = "c4"
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Source:
    """A parsed source name. ``kind`` is ``gensim``, ``hub`` or ``local``."""

    kind: str
    key: str  # canonical identity used by the overlap guard
    spec: HubSpec | None = None
    files: tuple[str, ...] = ()
    builder: str | None = None

    def default_split(self, purpose: str) -> str | None:
        """Default split for ``purpose`` (``calib`` or ``eval``)."""
        if self.kind == "local":
            return None
        if self.kind == "gensim":
            return "train" if purpose == "calib" else "test"
        assert self.spec is not None
        return self.spec.calib_split if purpose == "calib" else self.spec.eval_split


def _local_files(path: Path) -> tuple[tuple[str, ...], str]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_EXTENSIONS)
        if not files:
            raise DataError(f"folder {path} holds no .txt/.jsonl/.json/.parquet file")
    kinds = {LOCAL_EXTENSIONS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise DataError(f"{path}: unsupported file type; use .txt, .jsonl, .json or .parquet")
    if len(kinds) > 1:
        raise DataError(f"folder {path} mixes file types ({', '.join(sorted(kinds))}); use one kind")
    return tuple(str(p.resolve()) for p in files), kinds.pop()


def _looks_like_path(source: str) -> bool:
    """Starts like a path, has a data-file extension, or has more slashes than ``owner/name``."""
    return (
        source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in LOCAL_EXTENSIONS
        or source.split(":")[0].count("/") > 1
    )


def resolve_source(source: str) -> Source:
    """Parse a source name into a :class:`Source` (no I/O beyond checking local paths)."""
    if not isinstance(source, str) or not source.strip():
        raise DataError("empty data source name")
    source = source.strip()
    if source in GENSIM_SOURCES:
        return Source("gensim", source)
    if source in HUB_SOURCES:
        return Source("hub", source, spec=HUB_SOURCES[source])
    if not source.startswith("hf:"):
        path = Path(source).expanduser()
        if path.exists():
            files, builder = _local_files(path)
            return Source("local", str(path.resolve()), files=files, builder=builder)
        if _looks_like_path(source):
            raise DataError(
                f"data source {source!r} is neither a file nor a folder here; named sources are "
                f"{', '.join([*HUB_SOURCES, *GENSIM_SOURCES])}, or hf:<name>[:config]"
            )
    name = source.removeprefix("hf:")
    repo, _, config = name.partition(":")
    if not repo:
        raise DataError(f"data source {source!r} names no dataset")
    spec = HubSpec(path=repo, name=config or None, description="Hub dataset")
    return Source("hub", f"hf:{repo}:{config}", spec=spec)


# --- the datasets code path -------------------------------------------------------------------

Loader = Callable[..., Any]
_HUB_REACHABLE: dict[str, bool] = {}  # endpoint -> answered, asked once per process


def hub_offline() -> bool:
    """Whether the user asked for offline mode: ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set to a true value now, or offline mode set in ``huggingface_hub`` /
    ``datasets`` by code."""
    if any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in OFFLINE_ENV):
        return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - a dependency of datasets
        pass
    try:
        import datasets.config as dconfig

        return bool(dconfig.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def hub_endpoint() -> str:
    """The Hub URL in use: ``HF_ENDPOINT`` (read now) or huggingface_hub's configured endpoint."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub answers an HTTP request (any status) — asked once per process and endpoint
    through ``huggingface_hub``'s session, so ``HF_ENDPOINT`` and the proxies in the environment
    apply as for a real download. False at once in offline mode, without a request."""
    if hub_offline():
        return False
    endpoint = hub_endpoint()
    if endpoint not in _HUB_REACHABLE:
        from huggingface_hub import get_session

        try:
            get_session().head(endpoint, timeout=timeout, follow_redirects=False)
            _HUB_REACHABLE[endpoint] = True
        except Exception:  # connection, proxy, TLS or timeout errors of httpx / requests
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Force datasets / huggingface_hub offline mode (cache only) for the duration."""
    import datasets.config as dconfig

    try:
        from huggingface_hub import constants as hconst
    except Exception:  # pragma: no cover
        hconst = None
    old = (dconfig.HF_HUB_OFFLINE, getattr(hconst, "HF_HUB_OFFLINE", None))
    dconfig.HF_HUB_OFFLINE = True
    if hconst is not None:
        hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconfig.HF_HUB_OFFLINE = old[0]
        if hconst is not None:
            hconst.HF_HUB_OFFLINE = old[1]


def _default_loader() -> Loader:
    import datasets

    return datasets.load_dataset


def _column(ds: Any, text_field: str, what: str) -> list[str]:
    names = list(getattr(ds, "column_names", []) or [])
    if text_field not in names:
        raise DataError(f"{what} has no text field {text_field!r}; its fields are: {', '.join(names)}")
    return [t for t in ds[text_field] if isinstance(t, str)]


def load_hub(
    spec: HubSpec, split: str, text_field: str | None = None, *, loader: Loader | None = None
) -> list[str]:
    """Rows of a Hub dataset via ``datasets`` (``HF_ENDPOINT`` picks a mirror, as everywhere)."""
    loader = loader or _default_loader()
    field_name = text_field or spec.text_field
    path = spec.path
    kwargs: dict[str, Any] = {"split": split}
    if spec.name:
        kwargs["name"] = spec.name
    if spec.data_files:
        if split not in spec.data_files:
            raise DataError(
                f"{spec.path}: split {split!r} not available; use one of {', '.join(spec.data_files)}"
            )
        kwargs["data_files"] = {split: spec.data_files[split]}
    what = f"dataset {spec.path}" + (f" ({spec.name})" if spec.name else "") + f" split {split!r}"
    offline = not hub_reachable()
    try:
        with offline_mode() if offline else contextlib.nullcontext():
            ds = loader(path, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        hint = (
            f"the Hugging Face Hub ({hub_endpoint()}) is offline or not reachable from here and the "
            "dataset is not in the local cache; "
            if offline
            else ""
        )
        raise DataError(
            f"could not download {what} ({reason}); {hint}use a local .txt/.jsonl/.parquet file or "
            "folder, 'wiki-excerpt' (offline Wikipedia text), or set HF_ENDPOINT to a mirror"
        ) from exc
    return _column(ds, field_name, what)


def load_local(
    files: tuple[str, ...], builder: str, text_field: str = "text", *, loader: Loader | None = None
) -> list[str]:
    """Rows of local files through ``datasets.load_dataset(builder, data_files=...)``."""
    loader = loader or _default_loader()
    kwargs: dict[str, Any] = {"data_files": list(files), "split": "train"}
    if builder == "text":
        kwargs["sample_by"] = "paragraph"
        text_field = "text"
    what = files[0] if len(files) == 1 else f"{len(files)} files under {os.path.commonpath(files)}"
    try:
        ds = loader(builder, **kwargs)
    except Exception as exc:
        raise DataError(f"could not read {what} ({type(exc).__name__}: {exc})") from exc
    return _column(ds, text_field, what)


def load_text(
    source: str,
    split: str | None = None,
    text_field: str = "text",
    *,
    purpose: str = "calib",
    loader: Loader | None = None,
    drop_empty: bool = True,
) -> list[str]:
    """The documents (rows) of ``source``; blank rows are dropped unless ``drop_empty=False``
    (the perplexity recipe keeps WikiText's blank rows so the joined text matches the papers').

    ``split`` defaults to the source's calibration split (``purpose="calib"``) or evaluation split
    (``purpose="eval"``); local files have no splits. ``loader`` replaces ``datasets.load_dataset``
    (same call signature) — for tests and custom readers.
    """
    src = resolve_source(source)
    split = split or src.default_split(purpose)
    if src.kind == "gensim":
        docs = load_gensim_text(src.key, split or "train")
    elif src.kind == "hub":
        assert src.spec is not None and split is not None
        docs = load_hub(src.spec, split, None if text_field == "text" else text_field, loader=loader)
    else:
        if split not in (None, "train"):
            raise DataError(f"{source}: local files have no split {split!r}; leave the split unset")
        assert src.builder is not None
        docs = load_local(src.files, src.builder, text_field, loader=loader)
    if drop_empty:
        docs = [d for d in docs if d.strip()]
    if not any(d.strip() for d in docs):
        raise DataError(f"data source {source!r} (split {split}) has no text")
    return docs
