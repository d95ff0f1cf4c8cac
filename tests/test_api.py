"""The one-call Python API (`alpsprune.oneshot`) and the notebook view of a report (issue 17, "Python API")."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

import alpsprune
from alpsprune import pipeline
from alpsprune.errors import AlpsPruneError
from alpsprune.models import get_weight, list_target_layers
from alpsprune.report import LayerRecord, PruneReport

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(alpsprune.__file__).resolve().parents[1]  # the alpsprune under test, for subprocesses


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: get_weight(m).detach().clone() for name, m in list_target_layers(model).items()}


def _tokens(vocab: int, n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def spy_calibration(monkeypatch):
    """Records the calibration tensor oneshot hands to prune_model."""
    seen: list[torch.Tensor] = []
    real = pipeline.prune_model

    def spy(model, calibration, **kwargs):
        seen.append(calibration.clone())
        return real(model, calibration, **kwargs)

    monkeypatch.setattr(pipeline, "prune_model", spy)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_oneshot_equals_prune_model(arch):
    """llm-compressor's spelling (sparsity=0.5 with "2:4") on a module: the same weights as prune_model."""
    model = make_tiny_model(arch)
    reference = copy.deepcopy(model)
    tokens = _tokens(model.config.vocab_size)
    result = alpsprune.oneshot(
        model=model,
        dataset=tokens,
        method="sparsegpt",
        sparsity=0.5,
        mask_structure="2:4",
        dampening_frac=0.05,
        progress=False,
    )
    report = alpsprune.prune_model(
        reference, tokens, method="sparsegpt", mask_structure="2:4", dampening_frac=0.05, progress=False
    )
    assert result.model is model  # pruned in place, like prune_model
    got, want = _weights(model), _weights(reference)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        assert torch.equal(got[name], want[name]), name
        groups = got[name].reshape(got[name].shape[0], -1, 4)
        assert int((groups != 0).sum(-1).max()) <= 2  # the 2:4 pattern holds
    assert [r.name for r in result.report.layers] == [r.name for r in report.layers]
    assert result.report.settings["mask_structure"] == "2:4"
    assert result.report.settings["solver_options"] == {"dampening_frac": 0.05}


def test_oneshot_named_dataset_matches_get_calibration(bundled_tokenizer, spy_calibration):
    tok = bundled_tokenizer
    model = make_tiny_model("llama", vocab_size=len(tok))
    reference = copy.deepcopy(model)
    alpsprune.oneshot(
        model,
        "wiki-excerpt",
        tokenizer=tok,
        num_calibration_samples=4,
        max_seq_length=32,
        seed=3,
        method="wanda",
        sparsity=0.6,
        progress=False,
    )
    calib = alpsprune.get_calibration("wiki-excerpt", tok, 4, 32, 3)
    assert torch.equal(spy_calibration[-1], calib)
    alpsprune.prune_model(reference, calib, method="wanda", sparsity=0.6, progress=False)
    for name, w in _weights(reference).items():
        assert torch.equal(_weights(model)[name], w), name


def test_oneshot_datasets_dataset_of_text(bundled_tokenizer, spy_calibration, tmp_path):
    """A datasets.Dataset of text gives the windows a local .jsonl file of the same rows gives."""
    from datasets import Dataset

    from alpsprune.data import load_text

    docs = load_text("wiki-excerpt", split="train")[:40]
    tok = bundled_tokenizer
    model = make_tiny_model("llama", vocab_size=len(tok))
    alpsprune.oneshot(
        model,
        Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}),
        tokenizer=tok,
        num_calibration_samples=3,
        max_seq_length=24,
        method="magnitude",
        sparsity=0.5,
        progress=False,
    )
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert torch.equal(spy_calibration[-1], alpsprune.get_calibration(str(jsonl), tok, 3, 24, 0))


def test_oneshot_tokenized_dataset(spy_calibration):
    from datasets import Dataset

    model = make_tiny_model("llama")
    rows = [list(range(i, i + n)) for i, n in enumerate([10, 40, 5, 33, 50])]  # ids < 256
    alpsprune.oneshot(
        model,
        Dataset.from_dict({"input_ids": rows}),
        num_calibration_samples=2,
        max_seq_length=32,
        method="magnitude",
        sparsity=0.5,
        progress=False,
    )
    assert torch.equal(spy_calibration[-1], torch.tensor([rows[1][:32], rows[3][:32]]))
    with pytest.raises(AlpsPruneError, match="input_ids rows of at least 32 tokens"):
        alpsprune.oneshot(
            model, Dataset.from_dict({"input_ids": rows}), num_calibration_samples=4, max_seq_length=32
        )


def test_oneshot_from_a_path_writes_a_loadable_output(tmp_path):
    from cli_helpers import make_model_dir
    from transformers import AutoModelForCausalLM

    folder = make_model_dir(tmp_path / "tiny")
    tokens = _tokens(200, n=3, length=16)
    result = alpsprune.oneshot(
        str(folder),
        dataset=tokens,
        sparsity=0.5,
        method="wanda",
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert result.output_dir == tmp_path / "out"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, w in _weights(result.model).items():
        assert torch.equal(_weights(reloaded)[name], w), name
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["settings"]["method"] == "wanda" and saved["settings"]["calib"] == "tokens(3, 16)"
    assert (tmp_path / "out" / "tokenizer.json").exists()
    with pytest.raises(AlpsPruneError, match="already holds a complete"):  # before loading anything
        alpsprune.oneshot(str(tmp_path / "absent"), dataset=tokens, sparsity=0.5, output_dir=tmp_path / "out")


def test_oneshot_fails_early_and_clearly(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="contradicts"):
        alpsprune.oneshot(
            str(tmp_path / "no-such-model"), dataset="wiki-excerpt", sparsity=0.3, mask_structure="2:4"
        )
    with pytest.raises(AlpsPruneError, match="tokenizer"):
        alpsprune.oneshot(model, dataset="wiki-excerpt", sparsity=0.5)
    with pytest.raises(AlpsPruneError, match="2-D integer tensor"):
        alpsprune.oneshot(model, dataset=torch.zeros(8), sparsity=0.5)
    with pytest.raises(AlpsPruneError, match="cannot give 8 samples"):
        alpsprune.oneshot(model, dataset=_tokens(256), num_calibration_samples=8, sparsity=0.5)


def test_oneshot_is_exported_and_import_stays_light():
    code = (
        "import sys, alpsprune, alpsprune.oneshot; "
        "print(callable(alpsprune.oneshot), 'transformers' in sys.modules, 'oneshot' in alpsprune.__all__)"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True"]


# --- PruneReport in Jupyter --------------------------------------------------------------------------------


class _Table(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.caption = ""
        self._cell: list[str] | None = None
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "caption":
            self._in_caption = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "caption":
            self._in_caption = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        elif self._in_caption:
            self.caption += data


def test_report_renders_as_an_html_table():
    layers = [
        LayerRecord(
            "model.layers.0.self_attn.q_proj",
            0,
            (64, 32),
            "alps",
            "0.5",
            0.5,
            1.25e-3,
            0.5,
            {"iterations": 7},
        ),
        LayerRecord("odd<name>&", 1, (8, 16), "alps", "0.5", 0.5, 2e-2, 0.25),
    ]
    report = PruneReport(
        settings={"method": "alps", "sparsity": 0.5}, layers=layers, seconds=1.0, model_sparsity=0.4
    )
    html = report._repr_html_()
    table = _Table()
    table.feed(html)
    assert table.rows[0] == ["layer", "shape", "method", "sparsity", "rel. error", "seconds", "iters"]
    assert table.rows[1] == [
        "model.layers.0.self_attn.q_proj",
        "64×32",
        "alps",
        "0.5000",
        "1.2500e-03",
        "0.50",
        "7",
    ]
    assert table.rows[2][0] == "odd<name>&" and "odd<name>" not in html  # escaped, not markup
    assert len(table.rows) == 1 + len(layers)
    assert "alps at 0.5" in table.caption and "whole model 0.4000" in table.caption
    result = alpsprune.OneshotResult(model=torch.nn.Linear(1, 1), tokenizer=None, report=report)
    assert result._repr_html_() == html
