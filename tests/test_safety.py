"""Issue 14: alpsprune never destroys what the user did not create, writes readable files, and says
when a selection or a model part is silently skipped.

* The folder-safety table: for ``prune --output``, ``compare --output`` and ``prune --checkpoint-dir``
  a folder holding a user's files (``thesis.tex``, ``data/x.csv``) is refused before the model is
  loaded and survives byte for byte, with and without ``--overwrite`` and ``--resume``; unsafe folders
  (``.``, ``/``, home, a parent of the current folder) are refused the same way.
* Foreign files *next to* alpsprune's own checkpoint survive a resumed or restarted run, and the
  checkpoint folder is removed only if it is then empty.
* Every file alpsprune writes has mode ``0666 & ~umask`` (under umask 022 and 027).
* ``--targets``/``--ignore``: llm-compressor's ``re:`` prefix and class names work, an entry that
  matches no module is a one-line error; fused MoE experts are reported, not silently skipped.
All CLI runs use a tiny random Llama through the real command path (magnitude: no solver time).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from safety_helpers import add_foreign_files, error_lines, run_cli, run_interrupted, snapshot
from tiny_models import make_tiny_model

from alpsprune import prune_model
from alpsprune.errors import TargetError
from alpsprune.io import is_complete_output

FAST = ["--method", "magnitude", "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from cli_helpers import make_corpus, make_model_dir

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("safety")
    model = make_model_dir(root / "model")
    calib, held_out = make_corpus(root / "corpus")
    return {"model": str(model), "calib": str(calib), "eval": str(held_out)}


def prune_argv(env, *extra: str, evaluate: bool = False) -> list[str]:
    ev = ["--eval", env["eval"], "--max-windows", "1"] if evaluate else ["--eval", "none"]
    return ["prune", env["model"], "--calib", env["calib"], *ev, *FAST, *extra]


def compare_argv(env, *extra: str) -> list[str]:
    return ["compare", env["model"], "--calib", env["calib"], "--eval", env["eval"], "--max-windows", "1"] + [
        "--methods", "magnitude", "--sparsities", "0.5", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
        "-q", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_loading(monkeypatch):
    """Refusals must come before the weights are read."""

    def tripwire(*a, **k):
        raise AssertionError("the model was loaded before the output folder was refused")

    monkeypatch.setattr("alpsprune.io.load_model", tripwire)


# ---- the table: a folder of the user's files survives, byte for byte --------------------------------------

TABLE = [
    ("prune", "--output", []),
    ("prune", "--output", ["--overwrite"]),
    ("prune", "--output", ["--resume"]),
    ("compare", "--output", []),
    ("compare", "--output", ["--overwrite"]),
    ("prune", "--checkpoint-dir", []),
    ("prune", "--checkpoint-dir", ["--overwrite"]),
    ("prune", "--checkpoint-dir", ["--resume"]),
]


@pytest.mark.parametrize(
    ("command", "flag", "extra"), TABLE, ids=[f"{c} {f} {' '.join(e)}" for c, f, e in TABLE]
)
def test_foreign_folder_is_refused_and_survives(env, tmp_path, no_loading, command, flag, extra):
    folder = tmp_path / "user"
    before = add_foreign_files(folder)
    argv = [flag, str(folder), *extra]
    if flag == "--checkpoint-dir":
        argv += ["--output", str(tmp_path / "out")]
    code, _, err = run_cli(prune_argv(env, *argv) if command == "prune" else compare_argv(env, *argv))
    lines = error_lines(err, command)
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(folder) in lines[0]
    if "--resume" not in extra:  # the way out is named
        assert f"choose another {flag}" in lines[0], lines[0]
    assert snapshot(folder) == before
    assert not (tmp_path / "out").exists()


def test_eval_output_file_of_the_user_survives(env, tmp_path, monkeypatch):
    argv = [
        "eval",
        env["model"],
        "--ppl",
        env["eval"],
        "--seqlen",
        "32",
        "--max-windows",
        "1",
        "--device",
        "cpu",
    ]
    thesis = tmp_path / "thesis.tex"
    thesis.write_text("years of work\n")
    with monkeypatch.context() as m:
        m.setattr("alpsprune.io.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
        code, _, err = run_cli([*argv, "--output", str(thesis), "-q"])
    assert code == 2 and "was not written by alpsprune eval" in error_lines(err, "eval")[0], err
    assert thesis.read_text() == "years of work\n"
    ours = tmp_path / "eval.json"
    for _ in range(2):  # its own previous result is replaced
        code, _, err = run_cli([*argv, "--output", str(ours), "-q"])
        assert code == 0, err
    assert json.loads(ours.read_text())["perplexity"][env["eval"]]["windows"] == 1


def test_complete_output_with_a_users_file_is_not_overwritten(env, tmp_path, no_loading):
    """--overwrite replaces a previous alpsprune output only, not one a user has added files to."""
    from alpsprune.io import save_pruned

    out = save_pruned(make_tiny_model("llama", num_hidden_layers=1), None, tmp_path / "run", report={"x": 1})
    (out / "notes.md").write_text("my notes on this run\n")
    before = snapshot(out)
    code, _, err = run_cli(prune_argv(env, "--output", str(out), "--overwrite"))
    assert code == 2 and "notes.md" in error_lines(err)[0], err
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "where", [".", "/", "~", "..", "checkpoint:.", "checkpoint:runs/x", "checkpoint:runs"]
)
def test_unsafe_folders_are_refused_before_loading(env, tmp_path, monkeypatch, no_loading, where):
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    if where.startswith("checkpoint:"):
        argv = prune_argv(env, "--output", "runs/x", "--checkpoint-dir", where.split(":")[1])
    else:
        argv = prune_argv(env, "--output", where)
    code, _, err = run_cli(argv)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "a folder of its own" in lines[0]
    assert list(work.iterdir()) == [] and sorted(p.name for p in home.iterdir()) == ["work"]


# ---- foreign files next to alpsprune's own checkpoint survive ----------------------------------------------


@pytest.mark.parametrize("how", ["resume", "overwrite", "resume-default-checkpoint"])
def test_checkpoint_cleanup_removes_only_its_own_files(env, tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    if how == "resume-default-checkpoint":
        ckpt, flags = out / "checkpoint", []
    else:
        ckpt, flags = tmp_path / "ckpt", ["--checkpoint-dir", str(tmp_path / "ckpt")]
    argv = prune_argv(env, "--output", str(out), *flags)
    run_interrupted(argv, monkeypatch)
    assert (ckpt / "state.json").is_file()
    before = add_foreign_files(ckpt)

    code, _, err = run_cli(argv + [f"--{how.split('-')[0]}"])
    assert code == 0, err
    assert is_complete_output(out)
    assert snapshot(ckpt) == before  # the user's files, byte for byte, and nothing of alpsprune's
    if how == "resume-default-checkpoint":
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint"]


def test_checkpoint_folder_is_removed_when_only_alpsprune_wrote_there(env, tmp_path, monkeypatch):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = prune_argv(env, "--output", str(out), "--checkpoint-dir", str(ckpt), evaluate=True)
    run_interrupted(argv, monkeypatch)
    code, _, err = run_cli(argv + ["--resume"])
    assert code == 0, err
    assert not ckpt.exists() and is_complete_output(out)


def test_output_dot_fails_before_the_job_not_after(env, tmp_path, monkeypatch, no_loading):
    """`--output .` used to pass the check and fail after the whole prune (`'.' has an empty name`)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(prune_argv(env, "--output", "."))
    assert code == 2 and "--output . is the current folder" in err
    assert list(tmp_path.iterdir()) == []


# ---- file modes ------------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_every_file_gets_0666_minus_umask(env, tmp_path, monkeypatch, umask):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    argv = prune_argv(env, "--output", str(out), "--checkpoint-dir", str(ckpt), evaluate=True)
    run_interrupted(argv, monkeypatch, after_block=1)
    written = _modes(ckpt)
    assert any(name.startswith("block_") for name in written) and "state.json" in written
    assert {n: oct(m) for n, m in written.items() if m != file_mode} == {}

    code, _, err = run_cli(argv + ["--resume"])
    assert code == 0, err
    written = _modes(out)
    assert {"model.safetensors", "config.json", "report.json", "alpsprune_manifest.json"} <= written.keys()
    assert {n: oct(m) for n, m in written.items() if m != file_mode} == {}
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode

    compared = tmp_path / "compare"
    code, _, err = run_cli(compare_argv(env, "--output", str(compared)))
    assert code == 0, err
    written = _modes(compared)
    assert "compare.json" in written and {n: oct(m) for n, m in written.items() if m != file_mode} == {}


# ---- selections that select nothing, parts that are not pruned -------------------------------------------


def _calib(n: int = 2) -> torch.Tensor:
    return torch.randint(3, 200, (n, 16), generator=torch.Generator().manual_seed(0))


def test_llm_compressor_re_prefix_and_class_names():
    model = make_tiny_model("llama")
    down = {i: model.model.layers[i].mlp.down_proj.weight.clone() for i in range(3)}
    report = prune_model(
        model, _calib(), method="magnitude", sparsity=0.5, ignore=["re:.*down_proj"], progress=False
    )
    assert len(report.layers) == 18 and not any("down_proj" in r.name for r in report.layers)
    for i in range(3):  # ignored means untouched
        assert torch.equal(model.model.layers[i].mlp.down_proj.weight, down[i])
        assert float((model.model.layers[i].mlp.up_proj.weight == 0).float().mean()) == 0.5

    report = prune_model(make_tiny_model("llama"), _calib(), method="magnitude", sparsity=0.5, targets=["Linear"],
                         ignore=["lm_head"], progress=False)  # fmt: skip
    assert len(report.layers) == 21
    # re: is matched from the start of the name, as in llm-compressor
    with pytest.raises(TargetError, match="'re:down_proj' matches no module"):
        prune_model(
            make_tiny_model("llama"), _calib(), method="magnitude", sparsity=0.5, ignore=["re:down_proj"]
        )


def test_pattern_that_matches_no_module_is_an_error(env, tmp_path, no_loading):
    with pytest.raises(TargetError) as info:
        prune_model(
            make_tiny_model("llama"), _calib(), method="magnitude", sparsity=0.5, ignore=["mlp.down_prj"]
        )
    message = str(info.value)
    assert "ignore pattern 'mlp.down_prj' matches no module" in message
    assert "model.layers.0.self_attn.q_proj" in message and "\n" not in message
    code, _, err = run_cli(
        prune_argv(env, "--output", str(tmp_path / "o"), "--targets", "mlp", "--targets", "atn")
    )
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "targets pattern 'atn' matches no module" in lines[0], err


def _mixtral():
    import transformers

    config = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return config


def _qwen2_moe():
    import transformers

    return transformers.Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip


@pytest.mark.parametrize("make_config", [_mixtral, _qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_fused_moe_experts_are_reported_not_silently_skipped(make_config, caplog):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation="eager").eval()
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3}
    assert len(experts) == 4  # gate_up_proj and down_proj in each of 2 blocks
    with caplog.at_level(logging.WARNING, logger="alpsprune"):
        report = prune_model(model, _calib(), method="magnitude", sparsity=0.5, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "not pruned" in warnings[0] and "experts.gate_up_proj" in warnings[0] and "3-D" in warnings[0]
    recorded = json.loads(report.to_json())["extra"]["not_pruned"]
    assert sorted(recorded["parameters"]) == sorted(experts)
    assert 0 < recorded["fraction_of_block_weights"] < 1
    params = dict(model.named_parameters())
    for name, before in experts.items():
        assert torch.equal(params[name], before), name
    assert report.layers  # the attention (and shared experts) were pruned


def test_cli_records_fused_experts_in_report_json(env, tmp_path):
    import transformers

    from alpsprune.io import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = _mixtral()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    out = tmp_path / "out"
    argv = [
        "prune",
        str(tmp_path / "moe"),
        "--calib",
        env["calib"],
        "--eval",
        "none",
        *FAST,
        "--output",
        str(out),
    ]
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert err.count("not pruned: mlp.experts.down_proj, mlp.experts.gate_up_proj in every block") == 1, err
    recorded = json.loads((out / "report.json").read_text())["extra"]["not_pruned"]
    assert len(recorded["parameters"]) == 4 and "3-D" in recorded["reason"]
    assert "- not pruned: mlp.experts.down_proj" in (out / "report.md").read_text()
