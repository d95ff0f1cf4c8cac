"""Real English text that ships inside the ``gensim`` wheel, usable with no network.

``wiki-excerpt``
    The English Wikipedia excerpt ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
    from ``gensim/test/test_data``: main-namespace articles, redirects skipped, wiki markup removed with
    ``gensim.corpora.wikicorpus.filter_wiki`` and ``''``/``'''`` marks stripped, empty articles dropped.
    The parsed articles are cached as JSON (``$ALPSPRUNE_CACHE`` or ``~/.cache/alpsprune``).

``lee``
    ``lee_background.cor`` (300 short news stories, one per line) as a second domain.

Both are split **by document** with one fixed rule: the document with index ``i`` (in file order)
belongs to the ``test`` part when ``i % 4 == 3`` and to the ``train`` (calibration) part otherwise.
The two parts therefore never share a document; ``all`` gives every document.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
from pathlib import Path

from ..errors import DataError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
TEST_EVERY = 4  # document i goes to the test part when i % TEST_EVERY == TEST_EVERY - 1
SPLITS = ("train", "test", "all")
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """The folder for cached parsed text: ``$ALPSPRUNE_CACHE`` or ``~/.cache/alpsprune``."""
    env = os.environ.get("ALPSPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alpsprune"


def gensim_test_data() -> Path:
    """Folder of gensim's bundled test data (located without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the 'wiki-excerpt' and 'lee' sources need gensim (the demo extra): pip install 'alpsprune[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


def _clean(text: str) -> str:
    text = text.replace("'''", "").replace("''", "")
    lines = [line.rstrip() for line in text.splitlines()]
    text = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def _parse_wiki(path: Path) -> list[dict[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(path) as fh:
        for title, raw, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            body = _clean(filter_wiki(raw))
            if body:
                articles.append({"title": title, "text": f"{title}\n\n{body}"})
    return articles


def wiki_articles() -> list[dict[str, str]]:
    """All parsed articles (``title``, ``text``) in file order; parsed once, then read from the cache."""
    src = gensim_test_data() / WIKI_FILE
    if not src.is_file():
        raise DataError(f"gensim's Wikipedia excerpt is missing ({src}); reinstall gensim==4.4.0")
    cache = cache_dir() / f"wiki_excerpt_v{_CACHE_VERSION}.json"
    if cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if data.get("source_size") == src.stat().st_size:
                return data["articles"]
        except (OSError, ValueError, KeyError):
            pass
    articles = _parse_wiki(src)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        payload = {"version": _CACHE_VERSION, "source_size": src.stat().st_size, "articles": articles}
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        tmp.replace(cache)
    except OSError:
        pass  # an unwritable cache only costs re-parsing next time
    return articles


def lee_documents() -> list[str]:
    """The 300 news stories of ``lee_background.cor``, one per line, in file order."""
    src = gensim_test_data() / LEE_FILE
    if not src.is_file():
        raise DataError(f"gensim's lee_background.cor is missing ({src}); reinstall gensim==4.4.0")
    text = src.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_documents(docs: list[str], split: str) -> list[str]:
    """Apply the fixed by-document rule (``i % 4 == 3`` → test) to ``docs``."""
    if split == "all":
        return list(docs)
    if split == "test":
        return [d for i, d in enumerate(docs) if i % TEST_EVERY == TEST_EVERY - 1]
    if split == "train":
        return [d for i, d in enumerate(docs) if i % TEST_EVERY != TEST_EVERY - 1]
    raise DataError(f"unknown split {split!r} for a gensim source; use one of {', '.join(SPLITS)}")


def load_gensim_text(name: str, split: str) -> list[str]:
    """Documents of ``wiki-excerpt`` or ``lee`` for ``split`` (train / test / all)."""
    if name == "wiki-excerpt":
        docs = [a["text"] for a in wiki_articles()]
    elif name == "lee":
        docs = lee_documents()
    else:
        raise DataError(f"unknown gensim source {name!r}")
    return split_documents(docs, split)
