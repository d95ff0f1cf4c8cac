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


# --- lm-eval parity (issue 16 item 3) ------------------------------------------------------------------


def _write_task(folder: Path, name: str = "tiny_mc", dataset: str | None = None) -> Path:
    """A multiple-choice task over the local fixture (or over ``dataset``, e.g. a Hub name)."""
    source = (
        f"dataset_path: {dataset}"
        if dataset
        else f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {FIXTURE.resolve()}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    body = textwrap.dedent(
        """\
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """
    )
    (folder / f"{name}.yaml").write_text(f"task: {name}\n{source}\n{body}", encoding="utf-8")
    return folder


def test_local_tasks_need_no_network_probe(tmp_path, bundled_tokenizer, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from alpsprune.evaluation import lmeval

    tasks = _write_task(tmp_path / "tasks")
    _write_task(tmp_path / "tasks", "hub_mc", dataset="someone/some_dataset")
    manager = TaskManager(include_path=[str(tasks)], include_defaults=False)
    assert lmeval._local_task(manager, "tiny_mc", [str(tasks)])
    assert not lmeval._local_task(manager, "hub_mc", [str(tasks)])  # data from the Hub: probe needed
    assert not lmeval._local_task(manager, "tiny_mc", [])

    def probe():
        raise AssertionError("the Hub was probed for a purely local task")

    monkeypatch.setattr(lmeval, "hub_reachable", probe)
    model = make_tiny_model("llama", vocab_size=len(bundled_tokenizer), max_position_embeddings=256)
    res = zero_shot(
        model, bundled_tokenizer, tasks=["tiny_mc"], limit=2, include_path=tasks, include_defaults=False
    )
    assert set(res) == {"tiny_mc"}


@pytest.mark.slow
def test_eval_cli_passes_lm_eval_flags_through(tmp_path, monkeypatch, capsys):
    lm_eval = pytest.importorskip("lm_eval")
    import json
    import math

    from cli_helpers import make_model_dir

    from alpsprune.cli.main import main

    folder = make_model_dir(tmp_path / "tiny")
    tasks = _write_task(tmp_path / "tasks")
    seen: list[dict] = []
    real = lm_eval.simple_evaluate

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    out = tmp_path / "lm-eval-out"
    argv = ["eval", str(folder), "--ppl", "none", "--tasks", "tiny_mc", "--include-path", str(tasks)]
    argv += ["--num-fewshot", "1", "--limit", "0.5", "--batch-size", "auto", "--max-batch-size", "4"]
    argv += ["--apply-chat-template", "--output-path", str(out), "--log-samples", "-q"]
    assert main([*argv, "--output", str(tmp_path / "eval.json")]) == 0
    kw = seen[-1]
    assert kw["tasks"] == ["tiny_mc"] and kw["num_fewshot"] == 1 and kw["limit"] == 0.5
    assert kw["batch_size"] == "auto" and kw["max_batch_size"] == 4
    assert kw["apply_chat_template"] is True and kw["fewshot_as_multiturn"] is True  # lm-eval CLI's rule
    assert kw["log_samples"] is True and kw["evaluation_tracker"] is not None

    # lm-eval's own files: <out>/<model>/results_<date>.json and samples_<task>_<date>.jsonl
    results_files = list(out.rglob("results_*.json"))
    assert len(results_files) == 1
    full = json.loads(results_files[0].read_text())
    assert {"results", "configs", "config", "n-shot", "versions", "task_hashes"} <= set(full)
    assert full["n-shot"]["tiny_mc"] == 1 and full["config"]["limit"] == 0.5
    assert full["chat_template"] and full["fewshot_as_multiturn"] is True
    n_docs = sum(1 for _ in FIXTURE.open())
    samples = list(out.rglob("samples_tiny_mc_*.jsonl"))
    assert len(samples) == 1
    assert len(samples[0].read_text().splitlines()) == math.ceil(n_docs * 0.5)
    ours = json.loads((tmp_path / "eval.json").read_text())
    assert ours["zero_shot"]["tiny_mc"]["acc"] == full["results"]["tiny_mc"]["acc,none"]
    assert ours["lm_eval"]["limit"] == 0.5 and ours["lm_eval"]["num_fewshot"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "1.5"], "--limit"),
        (["--limit", "0"], "--limit"),
        (["--batch-size", "many"], "--batch-size"),
        (["--log-samples"], "--log-samples needs --output-path"),
        (["--fewshot-as-multiturn"], "--fewshot-as-multiturn needs --apply-chat-template"),
    ],
)
def test_eval_cli_rejects_bad_lm_eval_flags(argv, message, capsys):
    from alpsprune.cli.main import main

    try:
        code = main(["eval", "--ppl", "none", "--tasks", "x", *argv])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_limit_and_batch_size_parsing():
    from alpsprune.cli.evaluate import _batch_size, _limit

    assert _limit("100") == 100 and isinstance(_limit("100"), int)
    assert _limit("0.25") == 0.25
    assert _batch_size("auto") == "auto" and _batch_size("auto:4") == "auto:4" and _batch_size("8") == 8


def test_local_tasks_skip_indexing_builtin_tasks(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from alpsprune.evaluation.lmeval import _task_manager

    built: list[bool] = []

    class Recording(TaskManager):
        def __init__(self, include_path=None, include_defaults=True):
            built.append(include_defaults)
            super().__init__(include_path=include_path, include_defaults=False)  # keep the test fast

    tasks = str(_write_task(tmp_path / "tasks"))
    _task_manager(Recording, ["tiny_mc"], [tasks], True)
    assert built == [False]  # the include path alone
    built.clear()
    _task_manager(Recording, ["tiny_mc", "piqa"], [tasks], True)  # piqa is a built-in: full index
    assert built == [False, True]
