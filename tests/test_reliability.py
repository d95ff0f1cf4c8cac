"""Bad input fails early with one line and a specific exception type; interrupted saves and solver failures are safe.

The table drives `alpsprune prune` in-process (`alpsprune.cli.main.main`): every case must exit with code 2 and
print exactly one `alpsprune prune: error: ...` line that names the problem, with no traceback. The exception
behind the line is recorded by wrapping the command, so each case also pins the API's exception type. Cases
marked *early* must fail before any weight is loaded (`load_model` is replaced by a tripwire).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from alpsprune import errors
from alpsprune.cli import prune as prune_cli
from alpsprune.cli.common import UsageError
from alpsprune.cli.main import main
from alpsprune.io import is_complete_output, save_pruned


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny local Llama (SmolLM2 tokenizer), a tiny BERT, a non-model folder, corpora, a finished output."""
    import transformers

    from alpsprune.data import load_text
    from alpsprune.io import load_tokenizer

    root = tmp_path_factory.mktemp("reliability")
    tokenizer = load_tokenizer(None)
    model = make_tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2, tie_word_embeddings=True)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    bert = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128
    )
    transformers.BertModel(bert).save_pretrained(root / "bert")
    (root / "notmodel").mkdir()
    (root / "notmodel" / "notes.txt").write_text("not a model")
    (root / "calib.txt").write_text("\n\n".join(load_text("wiki-excerpt", split="train")[:2]) + "\n")
    (root / "small.txt").write_text("Just a few words of text.\n")
    save_pruned(model, None, root / "done", report={"layers": []})  # a complete output
    names = {"tiny": "tiny", "bert": "bert", "notmodel": "notmodel", "done": "done", "calib": "calib.txt"}
    return {"root": root, "small": root / "small.txt", **{k: root / v for k, v in names.items()}}


def _stale_checkpoint(files: dict[str, Path], out: Path) -> None:
    """A real checkpoint of another run of the same model (other sparsity, other calibration) in `out/checkpoint`."""
    from alpsprune import load_model, prune_model

    model, _ = load_model(files["tiny"])
    calib = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    prune_model(
        model, calib, method="magnitude", sparsity=0.3, checkpoint_dir=out / "checkpoint", progress=False
    )


# id, extra args (MODEL first; "{x}" → files[x]), exception type, fragments the message must contain, early
CASES = [
    ("missing-model", ["{root}/no-such-model"], errors.ModelError, ["no-such-model", "does not exist"], True),
    ("folder-not-a-model", ["{notmodel}"], errors.ModelError, ["notmodel", "no config.json"], True),
    ("encoder-model", ["{bert}"], errors.ModelError, ["bert", "not a decoder-only causal LM"], True),
    (
        "sparsity-too-big",
        ["{tiny}", "--sparsity", "1.2"],
        UsageError,
        ["sparsity must be in [0, 1)", "1.2"],
        True,
    ),
    (
        "n-greater-than-m",
        ["{tiny}", "--mask-structure", "3:2"],
        UsageError,
        ["'3:2'", "cannot exceed M"],
        True,
    ),
    (
        "nm-does-not-fit",
        ["{tiny}", "--mask-structure", "2:7"],
        errors.TargetError,
        ["model.layers.0.self_attn.q_proj", "multiple of M=7", "64"],
        True,
    ),
    (
        "targets-match-nothing",
        ["{tiny}", "--targets", "attention_xyz"],
        errors.TargetError,
        ["targets pattern 'attention_xyz' matches no module", "model.layers.0.self_attn.q_proj"],
        True,
    ),
    (
        "invalid-regex",
        ["{tiny}", "--targets", "mlp.(up"],
        errors.TargetError,
        ["invalid targets regex", "mlp.(up"],
        True,
    ),
    (
        "missing-calibration",
        ["{tiny}", "--calib", "{root}/nope.txt"],
        errors.DataError,
        ["nope.txt", "neither a file nor a folder"],
        True,
    ),
    (
        "calibration-too-small",
        ["{tiny}", "--calib", "{small}"],
        errors.DataError,
        ["small.txt", "tokens;", "4 × 64 = 256 tokens are needed"],
        True,
    ),
    (
        "output-complete",
        ["{tiny}", "--output", "{done}"],
        errors.OutputError,
        ["already holds a complete alpsprune output", "--overwrite"],
        True,
    ),
    (
        "device-cuda-absent",
        ["{tiny}", "--device", "cuda"],
        errors.DeviceError,
        ["CUDA is not available"],
        True,
    ),
    ("device-unknown", ["{tiny}", "--device", "tpu"], errors.DeviceError, ["unknown device 'tpu'"], True),
    ("fp16-on-cpu", ["{tiny}", "--dtype", "float16"], errors.DeviceError, ["float16", "CPU"], True),
    (
        "resume-nothing",
        ["{tiny}", "--resume"],
        errors.CheckpointError,
        ["nothing to resume", "state.json"],
        True,
    ),
    (
        "resume-other-settings",
        ["{tiny}", "--resume", "STALE"],
        errors.CheckpointError,
        ["different settings", "without --resume"],
        False,
    ),
    ("unfinished-no-resume", ["{tiny}", "STALE"], errors.OutputError, ["unfinished run", "--resume"], True),
    ("unknown-solver-opt", ["{tiny}", "--solver-opt", "bogus=1"], UsageError, ["bogus", "pcg_steps"], True),
    (
        "solver-opt-syntax",
        ["{tiny}", "--solver-opt", "pcg_steps"],
        UsageError,
        ["KEY=VALUE", "pcg_steps"],
        True,
    ),
    (
        "option-of-other-method",
        ["{tiny}", "--method", "magnitude", "--dampening-frac", "0.1"],
        UsageError,
        ["dampening_frac", "magnitude"],
        True,
    ),
    (
        "nsamples-zero",
        ["{tiny}", "--nsamples", "0"],
        UsageError,
        ["--nsamples must be at least 1", "0"],
        True,
    ),
    ("seqlen-tiny", ["{tiny}", "--seqlen", "2"], UsageError, ["--seqlen must be at least 8"], True),
    (
        "faithful-with-dense-target",
        ["{tiny}", "--faithful", "--dense-target"],
        errors.AlpsPruneError,
        ["faithful=True", "dense_target=True"],
        True,
    ),
    (
        "block-with-dense-default",
        ["{tiny}", "--sparsity", "0.7", "--sequential", "block"],
        errors.AlpsPruneError,
        ["needs sequential='sublayer'", "--no-dense-target"],
        True,
    ),
    (
        "owl-with-nm",
        ["{tiny}", "--mask-structure", "2:4", "--allocation", "owl"],
        errors.AlpsPruneError,
        ["unstructured sparsity", "2:4"],
        True,
    ),
]


@pytest.mark.parametrize(("case", "args", "exc_type", "fragments", "early"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(
    case, args, exc_type, fragments, early, files, tmp_path, monkeypatch, capsys
) -> None:
    if case == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    stale = "STALE" in args
    if stale:
        _stale_checkpoint(files, out)
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args if a != "STALE"]
    defaults = {
        "--calib": str(files["calib"]),
        "--output": str(out),
        "--device": "cpu",
        "--eval": "none",
        "--nsamples": "4",
        "--seqlen": "64",
    }
    argv = ["prune", *argv, *[x for flag, v in defaults.items() if flag not in argv for x in (flag, v)], "-q"]

    raised: list[BaseException] = []
    real_run = prune_cli.run

    def recording_run(a):
        try:
            return real_run(a)
        except BaseException as exc:
            raised.append(exc)
            raise

    monkeypatch.setattr(prune_cli, "run", recording_run)
    if early:

        def tripwire(*a, **k):
            raise AssertionError("the model was loaded before the bad input was detected")

        monkeypatch.setattr("alpsprune.io.load_model", tripwire)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("alpsprune prune")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("alpsprune prune: error: "), err
    message = lines[0]
    assert "\n" not in str(raised[0])
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert type(raised[0]) is exc_type, f"{type(raised[0]).__name__}: {raised[0]}"
    if not stale:
        assert not is_complete_output(out) and not (out / "checkpoint").exists()


def test_cli_logs_how_many_layers_matched(files, tmp_path, capsys) -> None:
    code = main(
        ["prune", str(files["tiny"]), "--calib", str(files["calib"]), "--eval", "none", "--method",
         "magnitude", "--targets", r"mlp\.", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
         "--output", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0
    assert "targets: 6 linear layers in 2 blocks" in capsys.readouterr().err
    assert is_complete_output(tmp_path / "o")


# ---- the API raises the same types ----------------------------------------------------------------


def test_api_exception_types(files, tmp_path) -> None:
    from alpsprune import io
    from alpsprune.checkpoint import load_checkpoint
    from alpsprune.data import get_calibration
    from alpsprune.pipeline import plan_pruning, resolve_device

    model = make_tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(errors.TargetError, match=r"\[0, 1\)"):
        plan_pruning(model, sparsity=1.2)
    with pytest.raises(errors.TargetError, match="N .kept per group. cannot exceed M"):
        plan_pruning(model, mask_structure="3:2")
    with pytest.raises(errors.TargetError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        plan_pruning(model, mask_structure="2:7")
    with pytest.raises(errors.AlpsPruneError, match="unknown method 'obs'"):
        plan_pruning(model, method="obs", sparsity=0.5)
    with pytest.raises(errors.AlpsPruneError, match="unknown option"):
        plan_pruning(model, method="wanda", sparsity=0.5, pcg_steps=3)
    with pytest.raises(errors.DeviceError):
        resolve_device("tpu")
    with pytest.raises(errors.ModelError, match="does not exist"):
        io.load_model(str(tmp_path / "missing"))
    with pytest.raises(errors.ModelError, match="encoder"):
        io.load_model(files["bert"])
    with pytest.raises(errors.ModelError, match="encoder"):
        io.model_skeleton(files["bert"])
    with pytest.raises(errors.DataError, match=r"has \d+ tokens"):
        get_calibration(str(files["small"]), io.load_tokenizer(files["tiny"]), 4, 64)
    with pytest.raises(errors.OutputError, match="complete"):
        save_pruned(model, None, files["done"])
    with pytest.raises(errors.CheckpointError, match="nothing to resume"):
        load_checkpoint(tmp_path / "none", {}, torch.zeros(1, 4, dtype=torch.long))
    skeleton = io.model_skeleton(files["tiny"])  # weights never read
    assert next(skeleton.parameters()).device.type == "meta"


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path) -> None:
    from alpsprune import prune_model

    calib = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(method="magnitude", sparsity=0.5, progress=False, checkpoint_dir=tmp_path / "ck")
    prune_model(make_tiny_model("llama", num_hidden_layers=2), calib, **kwargs)
    inputs = json.loads((tmp_path / "ck" / "state.json").read_text())["inputs"]["files"][0]
    (tmp_path / "ck" / inputs).write_bytes(b"truncated")
    with pytest.raises(errors.CheckpointError, match="corrupt"):
        prune_model(make_tiny_model("llama", num_hidden_layers=2), calib, resume=True, **kwargs)


# ---- atomic outputs ---------------------------------------------------------------------------------


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and p.name.startswith(out.name))


@pytest.mark.parametrize("where", ["_write_report", "_write_manifest"])
def test_interrupted_save_leaves_nothing_complete(where, tmp_path, monkeypatch) -> None:
    from alpsprune import io

    model = make_tiny_model("llama", num_hidden_layers=1)
    out = tmp_path / "out"

    def crash(*a, **k):
        raise KeyboardInterrupt  # what Ctrl-C (or any BaseException) does mid-save

    monkeypatch.setattr(io, where, crash)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, None, out, report={"layers": []})
    assert not out.exists() and not is_complete_output(out)
    assert _siblings(out) == []  # no stray .tmp-<pid> folder


def test_interrupted_overwrite_keeps_the_previous_output(tmp_path, monkeypatch) -> None:
    from alpsprune import io

    model = make_tiny_model("llama", num_hidden_layers=1)
    out = save_pruned(model, None, tmp_path / "out", report={"run": 1})
    monkeypatch.setattr(io, "_write_manifest", lambda folder: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(errors.OutputError, match="disk full"):
        save_pruned(model, None, out, report={"run": 2}, overwrite=True)
    assert is_complete_output(out)
    assert json.loads((out / "report.json").read_text()) == {"run": 1}
    assert _siblings(out) == []


# ---- numerical guards and solver failures ---------------------------------------------------------------


def _calib() -> torch.Tensor:
    return torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))


def test_nan_weight_is_reported_with_the_layer_name() -> None:
    from alpsprune import prune_model

    model = make_tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(errors.SolverError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN"):
        prune_model(model, _calib(), method="wanda", sparsity=0.5, progress=False)


def test_nan_activation_is_reported_with_the_layer_name() -> None:
    from alpsprune import prune_model

    model = make_tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(errors.SolverError, match=r"model\.layers\.0\.mlp\.(gate|up)_proj.*NaN/Inf"):
        prune_model(model, _calib(), method="magnitude", sparsity=0.5, progress=False)


def test_solver_exception_names_the_layer(monkeypatch) -> None:
    from alpsprune import prune_model
    from alpsprune.solvers.base import SOLVERS

    def broken(W, gram, spec, **opts):
        raise torch.linalg.LinAlgError("eigh did not converge")

    monkeypatch.setitem(SOLVERS, "magnitude", broken)
    with pytest.raises(
        errors.SolverError, match=r"model\.layers\.0\.self_attn\.q_proj: magnitude failed: .*eigh"
    ):
        prune_model(make_tiny_model("llama", num_hidden_layers=1), _calib(), method="magnitude", sparsity=0.5,
                    progress=False)  # fmt: skip


def test_out_of_memory_falls_back_to_cpu(monkeypatch, caplog) -> None:
    from alpsprune import prune_model
    from alpsprune.solvers.base import SOLVERS

    real = SOLVERS["magnitude"]
    calls = {"n": 0}

    def oom_once(W, gram, spec, **opts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(W, gram, spec, **opts)

    monkeypatch.setitem(SOLVERS, "magnitude", oom_once)
    with caplog.at_level(logging.WARNING, logger="alpsprune"):
        report = prune_model(make_tiny_model("llama", num_hidden_layers=1), _calib(), method="magnitude",
                             sparsity=0.5, progress=False)  # fmt: skip
    assert report.layers[0].info.get("cpu_fallback") is True
    assert "model.layers.0.self_attn.q_proj: out of memory" in caplog.text
    assert all(abs(r.sparsity - 0.5) < 1e-6 for r in report.layers)
