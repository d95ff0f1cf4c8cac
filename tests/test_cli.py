"""The command line end to end (issue 5): ``prune`` (unstructured and 2:4), ``eval`` and ``compare`` on a
tiny random local model folder and a tiny local corpus write the documented files with the documented
fields; PNGs are real images; bad arguments exit 2 with one line; every ``--help`` shows examples."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alpsprune.cli.main import main

FAST = ["--nsamples", "4", "--seqlen", "64", "--max-windows", "4", "-q"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``alpsprune ARGV`` in-process: (exit code, stdout, stderr); argparse's SystemExit becomes the code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return code, out.getvalue(), err.getvalue()


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    try:
        from PIL import Image
    except ImportError:  # the signature and header checks above must do
        return
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size == (width, height)
        img.load()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cli_helpers import make_corpus, make_model_dir

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    model = make_model_dir(root / "model")
    calib, held_out = make_corpus(root / "corpus")
    return {"root": root, "model": model, "calib": calib, "eval": held_out}


def prune_args(setup) -> list[str]:
    return ["prune", str(setup["model"]), "--calib", str(setup["calib"]), "--eval", str(setup["eval"]), *FAST]


@pytest.fixture(scope="module")
def pruned(setup):
    out = setup["root"] / "pruned-alps"
    code, stdout, stderr = run_cli(prune_args(setup) + ["--sparsity", "0.7", "--output", str(out)])
    assert code == 0, stderr
    return out, stdout


def test_prune_unstructured_writes_documented_files(setup, pruned):
    from transformers import AutoModelForCausalLM

    out, stdout = pruned
    for name in ("model.safetensors", "config.json", "report.json", "report.md", "layers.png"):
        assert (out / name).is_file(), name
    assert "alpsprune: alps at 70%" in stdout and str(out) in stdout

    report = json.loads((out / "report.json").read_text())
    assert {"settings", "summary", "layers", "extra"} <= report.keys()
    assert report["settings"]["method"] == "alps" and report["settings"]["sparsity"] == 0.7
    assert report["settings"]["nsamples"] == 4 and report["settings"]["seqlen"] == 64
    assert report["summary"]["layers"] == 21 and report["summary"]["blocks"] == 3
    assert abs(report["summary"]["targeted_sparsity"] - 0.7) < 1e-3
    assert len(report["layers"]) == 21
    for layer in report["layers"]:
        assert {"name", "block", "shape", "sparsity", "error", "seconds"} <= layer.keys()
        assert 0 <= layer["error"] < 1
    ppl = report["extra"]["perplexity"]
    key = str(setup["eval"])
    for which in ("dense", "pruned"):
        assert ppl[which][key]["ppl"] > 1 and ppl[which][key]["windows"] == 4
    assert ppl["seqlen"] == 64
    assert ppl["protocol"] == "papers"  # recorded; the SmolLM2 tokenizer adds no BOS, so auto = papers

    md = (out / "report.md").read_text()
    for section in ("## Settings", "## Perplexity", "## Summary", "## Layers", "layers.png"):
        assert section in md
    assert_png(out / "layers.png")

    # the default recipe at 70%: dense target + OWL, so per-layer sparsities vary around 70% (total exact)
    assert report["settings"]["allocation"] == "owl" and report["settings"]["dense_target"]
    assert (
        "pipeline: sequential=sublayer, dense_target=True, allocation=owl, "
        "reconstruction=4 epochs at lr 0.003 (token loss)" in stdout
    )
    assert report["settings"]["reconstruction"] == {"epochs": 4, "lr": 3e-3, "loss": "token", "seed": 0}
    assert_png(out / "allocation.png")
    recorded = {layer["name"]: layer["sparsity"] for layer in report["layers"]}
    model = AutoModelForCausalLM.from_pretrained(out)
    for i in range(3):
        w = model.model.layers[i].mlp.down_proj.weight
        zeros = float((w == 0).float().mean())
        assert abs(zeros - recorded[f"model.layers.{i}.mlp.down_proj"]) < 1e-3
        assert 0.5 - 1e-6 <= zeros <= 0.9 + 1e-6  # OWL's default bounds: s ± 0.2


def test_low_sparsity_recipe_reconstructs_after_the_papers_fits_and_takes_overrides(setup):
    out = setup["root"] / "pruned-alps-50"
    argv = prune_args(setup) + ["--sparsity", "0.5", "--reconstruct-lr", "1e-3", "--output", str(out)]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    # the recipe's epochs (2 at 60% and below), the lr given, the paper's layer fits
    assert (
        "pipeline: sequential=block, dense_target=False, allocation=uniform, "
        "reconstruction=2 epochs at lr 0.001 (token loss)" in stdout
    )
    assert "(the paper's, --faithful)" not in stdout
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["reconstruction"] == {"epochs": 2, "lr": 1e-3, "loss": "token", "seed": 0}


def test_prune_2of4(setup):
    from safetensors.torch import load_file

    out = setup["root"] / "pruned-2of4"
    argv = prune_args(setup) + ["--method", "sparsegpt", "--mask-structure", "2:4", "--output", str(out)]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    assert "2:4" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["mask_structure"] == "2:4"
    assert report["extra"]["perplexity"]["pruned"]
    assert_png(out / "layers.png")
    weights = load_file(str(out / "model.safetensors"))
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    kept = (q != 0).reshape(q.shape[0], -1, 4).sum(-1)
    assert int(kept.max()) <= 2


def test_eval_writes_json_with_perplexity(setup, pruned):
    out, _ = pruned
    target = setup["root"] / "eval.json"
    argv = ["eval", str(out), "--ppl", str(setup["eval"]), "--seqlen", "64", "--max-windows", "2"]
    code, stdout, stderr = run_cli(argv + ["--output", str(target), "-q"])
    assert code == 0, stderr
    result = json.loads(target.read_text())
    entry = result["perplexity"][str(setup["eval"])]
    assert entry["ppl"] > 1 and entry["windows"] == 2 and entry["seqlen"] == 64
    assert entry["protocol"] == "papers"
    assert "ppl" in stdout and str(target) in stdout


def test_compare_writes_json_md_png(setup):
    out = setup["root"] / "compare"
    argv = ["compare", str(setup["model"]), "--calib", str(setup["calib"]), "--eval", str(setup["eval"])]
    argv += ["--methods", "magnitude,wanda", "--sparsities", "0.5,2:4", *FAST, "--output", str(out)]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    result = json.loads((out / "compare.json").read_text())
    assert result["dense"][str(setup["eval"])] > 1
    runs = result["runs"]
    expected = {(m, p) for m in ("magnitude", "wanda") for p in ("0.5", "2:4")}
    assert len(runs) == 4 and {(r["method"], r["pattern"]) for r in runs} == expected
    for r in runs:
        assert {
            "method",
            "pattern",
            "sparsity",
            "ppl",
            "perplexity",
            "prune_seconds",
            "mean_error",
        } <= r.keys()
        assert r["ppl"] > 1
    md = (out / "compare.md").read_text()
    assert "magnitude" in md and "wanda" in md and "dense" in md
    assert_png(out / "compare.png")
    assert "compare.json" in stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["prune", "--sparsity", "1.5"],
        ["prune", "--sparsity", "0.4", "--mask-structure", "2:4"],
        ["prune", "--mask-structure", "5:4"],
        ["prune", "--method", "nope"],
        ["prune", "--nsamples", "0"],
        ["prune", "--seqlen", "abc"],
        ["prune", "--device", "tpu"],
        ["prune", "/no/such/model-folder"],
        ["prune", "--calib", "/no/such/corpus.txt"],
        ["prune", "--solver-opt", "novalue"],
        ["prune", "--reconstruct-epochs", "0"],
        ["prune", "--reconstruct-lr", "-1"],
        ["prune", "--faithful", "--reconstruct"],
        ["prune", "--no-reconstruct", "--reconstruct-epochs", "3"],
        ["prune", "--reconstruct-loss", "l1"],
        ["prune", "--no-reconstruct", "--reconstruct-loss", "token"],
        ["eval", "--ppl", "none"],
        ["compare", "--methods", "magnitude,bogus"],
        ["compare", "--sparsities", "0.5,abc"],
        ["frobnicate"],
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_arguments_exit_2_with_one_line(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written for a rejected command line
    code, stdout, stderr = run_cli(argv)
    assert code == 2, (stdout, stderr)
    message = stderr.strip()
    assert message and "\n" not in message, stderr
    assert "Traceback" not in stderr
    assert "error" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["prune", "eval", "compare"])
def test_subcommand_help_shows_examples(command):
    code, stdout, _ = run_cli([command, "--help"])
    assert code == 0
    assert "examples:" in stdout and f"alpsprune {command}" in stdout


def test_top_level_help_and_python_m_entry_point():
    code, stdout, _ = run_cli(["--help"])
    assert code == 0 and "examples:" in stdout
    proc = subprocess.run(
        [sys.executable, "-m", "alpsprune", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "examples:" in proc.stdout and "prune" in proc.stdout
