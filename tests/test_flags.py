"""Flags and names users of Hugging Face / llm-compressor expect (issue 17: "Flags and names", "Dependencies")."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import alpsprune
from alpsprune import sparsity as sparsity_mod
from alpsprune.cli.main import main
from alpsprune.errors import DataError, ModelError
from alpsprune.sparsity import SparsitySpec

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(alpsprune.__file__).resolve().parents[1]  # the alpsprune under test, for subprocesses


# --- --help: each default once; recipe-dependent defaults say "recipe" ----------------------------------


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def _option_blocks(text: str) -> dict[str, str]:
    """``{"--sparsity": "fraction of ... (default: ...)"}``: each option's help, lines joined."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("command", [[], ["prune"], ["eval"], ["compare"]])
def test_help_shows_each_default_once(capsys, command):
    text = _help(capsys, [*command, "--help"])
    blocks = _option_blocks(text)
    assert len(blocks) >= (2 if not command else 8)
    assert "(default: None)" not in " ".join(text.split())
    for option, help_text in blocks.items():
        assert help_text.count("default") <= 1, f"{option}: {help_text}"
    if command in (["prune"], ["compare"]):
        for option in ("--sequential", "--dense-target", "--allocation"):
            assert "(default: recipe" in blocks[option], blocks[option]
    if command == ["prune"]:
        assert "(default: 0.6 unless --mask-structure" in blocks["--sparsity"]
        assert "(default: alps)" in blocks["--method"]  # plain defaults are still shown


# --- sparsity together with mask_structure; "0:0"; the N-kept note ----------------------------------------


def test_sparsity_with_consistent_mask_structure():
    both = SparsitySpec.parse(0.5, "2:4")
    assert both == SparsitySpec.parse(mask_structure="2:4")
    assert SparsitySpec.parse(0.75, "1:4") == SparsitySpec.parse(mask_structure="1:4")
    assert SparsitySpec.parse(0.7, "0:0") == SparsitySpec.parse(0.7)
    assert not SparsitySpec.parse(0.7, " 0 : 0 ").is_nm
    with pytest.raises(ValueError, match=r"sparsity=0.6 contradicts mask_structure '2:4'.*set it to 0.5"):
        SparsitySpec.parse(0.6, "2:4")
    with pytest.raises(ValueError, match="means unstructured; give `sparsity`"):
        SparsitySpec.parse(None, "0:0")


def test_prune_layer_accepts_llm_compressor_spelling():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(64, 16, generator=g)
    gram = x.T @ x
    nm = alpsprune.prune_layer(w, gram, "sparsegpt", mask_structure="2:4")
    both = alpsprune.prune_layer(w, gram, "sparsegpt", sparsity=0.5, mask_structure="2:4")
    assert torch.equal(nm.weight, both.weight)
    unstructured = alpsprune.prune_layer(w, gram, "sparsegpt", sparsity=0.7)
    zero_zero = alpsprune.prune_layer(w, gram, "sparsegpt", sparsity=0.7, mask_structure="0:0")
    assert torch.equal(unstructured.weight, zero_zero.weight)
    assert int((zero_zero.weight == 0).sum()) == round(0.7 * 8 * 16)


@pytest.mark.parametrize(
    ("pattern", "kept", "other"),
    [("1:4", 1, "3:4"), ("3:4", 3, "1:4"), ("2:8", 2, "6:8"), ("2:4", None, None)],
)
def test_convention_note_once_where_readings_differ(caplog, monkeypatch, pattern, kept, other):
    monkeypatch.setattr(sparsity_mod, "_NOTED", set())
    with caplog.at_level(logging.INFO, logger="alpsprune"):
        SparsitySpec.parse(mask_structure=pattern)
        SparsitySpec.parse(mask_structure=pattern)  # logged once per pattern, not per layer
    lines = [r.getMessage() for r in caplog.records if r.name == "alpsprune"]
    if kept is None:  # 2:4 (and 4:8) read the same in both conventions
        assert lines == []
        return
    assert len(lines) == 1
    m = int(pattern.split(":")[1])
    assert f"keeps {kept} of every {m} weights" in lines[0]
    assert f"'{other}'" in lines[0]


def test_cli_takes_sparsity_with_mask_structure():
    from argparse import Namespace

    from alpsprune.cli.common import UsageError
    from alpsprune.cli.prune import resolve_spec

    spec = resolve_spec(Namespace(sparsity=0.5, mask_structure="2:4"))
    assert spec.label == "2:4"
    assert resolve_spec(Namespace(sparsity=0.7, mask_structure="0:0")) == SparsitySpec.parse(0.7)
    with pytest.raises(UsageError, match="contradicts"):
        resolve_spec(Namespace(sparsity=0.4, mask_structure="2:4"))


# --- loading flags reach io.load_model / load_tokenizer / model_skeleton ------------------------------------


class _Stop(Exception):
    pass


@pytest.fixture
def recorder(monkeypatch):
    """Replace the loaders with recorders; the first real load stops the command."""
    import alpsprune.io as io

    calls: dict[str, dict] = {}

    def skeleton(model, **kw):
        calls["model_skeleton"] = kw
        return None

    def tokenizer(model, **kw):
        calls["load_tokenizer"] = kw
        raise _Stop

    def model(model, **kw):
        calls["load_model"] = kw
        raise _Stop

    monkeypatch.setattr(io, "model_skeleton", skeleton)
    monkeypatch.setattr(io, "load_tokenizer", tokenizer)
    monkeypatch.setattr(io, "load_model", model)
    return calls


HUB = {"revision": "v1.0", "cache_dir": "/tmp/hf-cache", "trust_remote_code": True}
HUB_ARGS = ["--revision", "v1.0", "--cache-dir", "/tmp/hf-cache", "--trust-remote-code"]


@pytest.mark.parametrize("command", ["prune", "compare", "eval"])
def test_loading_flags_reach_the_loaders(recorder, capsys, tmp_path, command):
    argv = [command, "some-org/some-model", *HUB_ARGS]
    if command != "eval":
        argv += ["--output", str(tmp_path / "out")]
    else:
        argv += [
            "--output",
            str(tmp_path / "out.json"),
            "--device-map",
            "auto",
            "--max-memory",
            "0=2GiB,cpu=8GiB",
        ]
    assert main(argv) == 1  # stopped by the recorder
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "--trust-remote-code" in line]
    assert len(warnings) == 1 and "some-org/some-model" in warnings[0]
    if command == "prune":
        assert recorder["model_skeleton"] == HUB
        assert recorder["load_tokenizer"] == HUB
    else:
        kw = recorder["load_model"]
        assert {k: kw[k] for k in HUB} == HUB
    if command == "eval":
        assert recorder["load_model"]["device_map"] == "auto"
        assert recorder["load_model"]["max_memory"] == {0: "2GiB", "cpu": "8GiB"}


def test_no_remote_code_by_default(recorder, capsys, tmp_path):
    assert main(["compare", "some-org/some-model", "--output", str(tmp_path / "o")]) == 1
    assert recorder["load_model"]["trust_remote_code"] is False
    assert recorder["load_model"]["revision"] is None
    assert "trust-remote-code" not in capsys.readouterr().err


def test_max_memory_parsing():
    from alpsprune.cli.common import UsageError, parse_max_memory

    assert parse_max_memory("0=20GiB, 1=20GiB ,cpu=100GB") == {0: "20GiB", 1: "20GiB", "cpu": "100GB"}
    assert parse_max_memory(None) is None
    for bad in ("20GiB", "0=lots", "=1GiB", ","):
        with pytest.raises(UsageError, match="max-memory"):
            parse_max_memory(bad)


def test_device_map_load_matches_plain_load(tmp_path, monkeypatch):
    import transformers
    from cli_helpers import make_model_dir

    from alpsprune.io import load_model

    folder = make_model_dir(tmp_path / "tiny")
    plain, _ = load_model(folder)
    seen: list[dict] = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    budget = {"cpu": "1GiB"}
    mapped, _ = load_model(folder, device_map="auto", max_memory=budget, revision="main")
    assert seen[-1]["device_map"] == "auto" and seen[-1]["max_memory"] is not budget
    assert budget == {"cpu": "1GiB"}  # the caller's dict is not rewritten
    assert seen[-1]["revision"] == "main"
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, mapped(ids).logits)  # same CPU code path


def test_eval_cli_with_device_map(tmp_path, capsys):
    from cli_helpers import make_model_dir

    folder = make_model_dir(tmp_path / "tiny")
    out = tmp_path / "eval.json"
    argv = ["eval", str(folder), "--ppl", "wiki-excerpt", "--seqlen", "64", "--max-windows", "2", "-q"]
    assert main([*argv, "--output", str(out)]) == 0
    assert main([*argv, "--device-map", "cpu", "--output", str(tmp_path / "mapped.json")]) == 0
    plain = json.loads(out.read_text())["perplexity"]["wiki-excerpt"]["ppl"]
    mapped = json.loads((tmp_path / "mapped.json").read_text())["perplexity"]["wiki-excerpt"]["ppl"]
    assert plain == mapped


# --- plots leave matplotlib's global state alone ----------------------------------------------------------

_PLOT_SCRIPT = """
import json, sys, matplotlib
before = (matplotlib.get_backend(), dict(matplotlib.rcParams))
import alpsprune
from alpsprune.plots import plot_compare, plot_layers
from alpsprune.report import LayerRecord, PruneReport
layers = [LayerRecord(f"model.layers.{b}.mlp.{k}", b, (8, 8), "alps", "0.5", 0.5, 1e-3 * (b + 1), 0.1)
          for b in range(3) for k in ("up_proj", "down_proj")]
report = PruneReport(settings={"method": "alps", "sparsity": 0.5}, layers=layers)
out = sys.argv[1]
plot_layers(report, out + "/layers.png")
plot_compare([{"method": "alps", "pattern": "0.5", "sparsity": 0.5, "ppl": 20.0},
              {"method": "alps", "pattern": "2:4", "sparsity": 0.5, "ppl": 25.0}], out + "/compare.png", 10.0)
after = (matplotlib.get_backend(), dict(matplotlib.rcParams))
print(json.dumps({"backend": [before[0], after[0]], "rc_same": before[1] == after[1],
                  "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_plots_leave_matplotlib_global_state_alone(tmp_path):
    env = {**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", _PLOT_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"backend": ["svg", "svg"], "rc_same": True, "pyplot": False}
    for name in ("layers.png", "compare.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- dependencies: gguf and gensim only in the demo extra, with a clear message ----------------------------


def test_demo_only_dependencies_are_an_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[]", d)[0].lower() for d in project["dependencies"]]
    assert "gguf" not in names and "gensim" not in names
    assert set(project["optional-dependencies"]["demo"]) == {"gguf>=0.10", "gensim==4.4.0"}
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '".[test,eval,demo]"' in setup
    commands = [line for line in setup.splitlines() if not line.lstrip().startswith("#")]
    assert any(
        '"torch==2.13.0"' in line for line in commands
    )  # the plain pin: these machines' pip serves CPU
    assert not any("--index-url" in line for line in commands)


def test_missing_gguf_names_the_demo_extra(monkeypatch, tmp_path):
    from alpsprune.io import load_model

    monkeypatch.setenv("ALPSPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"pip install 'alpsprune\[demo\]'"):
        load_model(fake)


def test_missing_gensim_names_the_demo_extra(monkeypatch):
    import importlib.util

    from alpsprune.data import wiki_excerpt

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a)
    )
    with pytest.raises(DataError, match=r"pip install 'alpsprune\[demo\]'"):
        wiki_excerpt.gensim_test_data()
