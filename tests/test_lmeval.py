"""Zero-shot through lm-evaluation-harness, offline, with a tiny local task."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from alpsprune.errors import AlpsPruneError
from alpsprune.evaluation import PAPER_TASKS, MissingExtraError, zero_shot

FIXTURE = Path(__file__).parent / "fixtures" / "lmeval" / "tiny_mc.jsonl"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_paper_tasks():
    assert PAPER_TASKS == ("piqa", "arc_easy", "arc_challenge", "lambada_openai")


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(MissingExtraError, match=r"alpsprune\[eval\]"):
        zero_shot(torch.nn.Linear(1, 1), None, tasks=["x"])


def test_tiny_local_task(tmp_path, bundled_tokenizer):
    pytest.importorskip("lm_eval")
    tok = bundled_tokenizer
    model = make_tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    (tmp_path / "tiny_mc.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: tiny_mc
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {FIXTURE.resolve()}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: label
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """
        ),
        encoding="utf-8",
    )
    res = zero_shot(model, tok, tasks=["tiny_mc"], limit=4, include_path=tmp_path, include_defaults=False)
    assert set(res) == {"tiny_mc"}
    acc = res["tiny_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * 4 == round(acc * 4)  # 4 documents scored
    assert "acc_stderr" in res["tiny_mc"]
    with pytest.raises(AlpsPruneError, match="no_such_task"):
        zero_shot(model, tok, tasks=["no_such_task"], include_path=tmp_path, include_defaults=False)
