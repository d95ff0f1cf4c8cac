"""Kill a real `alpsprune prune` with SIGKILL mid-run, resume it, and get the uninterrupted run's weights bit for bit.

Design: a tiny random Llama (12 blocks, hidden 64, the bundled SmolLM2 tokenizer so the CLI loads it like any
local model) and a local text file. Run A is uninterrupted. Run B is the same command with another output: the
test polls B's `checkpoint/state.json` and sends SIGKILL as soon as at least one block is committed (if B
outruns the poll and finishes, it retries with a fresh output). Then `--resume` finishes B, and every tensor of
A's and B's `model.safetensors` must be equal byte for byte. Both runs use one thread, so the comparison does not
depend on how the machine's cores are shared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from alpsprune.cli.main import main
from alpsprune.io import is_complete_output

N_BLOCKS = 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alpsprune.data import load_text
    from alpsprune.io import load_tokenizer

    root = tmp_path_factory.mktemp("resume")
    tokenizer = load_tokenizer(None)
    model = make_tiny_model(
        "llama", vocab_size=len(tokenizer), num_hidden_layers=N_BLOCKS, tie_word_embeddings=True
    )
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    docs = load_text("wiki-excerpt", split="train")
    (root / "calib.txt").write_text("\n\n".join(docs[:4]) + "\n", encoding="utf-8")
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "alpsprune",
        "prune",
        str(root / "tiny"),
        "--calib",
        str(root / "calib.txt"),
        "--eval",
        "none",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--device",
        "cpu",
        "--output",
        str(out),
        "-q",
        *extra,
    ]


def _committed_blocks(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["next_block"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_after_first_block(cmd: list[str], out: Path, timeout: float = 120.0) -> int | None:
    """Start `cmd`, SIGKILL it once a block is committed; the committed count, or None if it finished first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _committed_blocks(out) >= 1:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return _committed_blocks(out)
            time.sleep(0.01)
        if proc.poll() is None:
            pytest.fail("the run committed no block within the timeout")
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        return None  # finished before the kill landed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_sigkill_then_resume_is_bit_identical(workdir: Path, tmp_path: Path, capsys) -> None:
    a = tmp_path / "A"
    uninterrupted = subprocess.Popen(
        _command(workdir, a), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        for attempt in range(3):
            b = tmp_path / f"B{attempt}"
            committed = _kill_after_first_block(_command(workdir, b), b)
            if committed is not None:
                break
        else:
            pytest.skip("the run always finished before SIGKILL landed (machine too fast for this model)")
        _, err = uninterrupted.communicate(timeout=300)
        assert uninterrupted.returncode == 0, err.decode()[-2000:]
    finally:
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()

    # The killed run left a checkpoint, and nothing that looks like a finished output.
    assert 1 <= committed <= N_BLOCKS
    assert not is_complete_output(b)
    assert not (b / "model.safetensors").exists()
    assert (b / "checkpoint" / f"block_{committed - 1:04d}.safetensors").exists()

    # Without --resume the unfinished checkpoint is protected, not silently overwritten (fails before loading).
    assert main(_command(workdir, b)[3:]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err.strip().splitlines()[-1]

    resumed = subprocess.run(
        _command(workdir, b, "--resume"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert is_complete_output(b) and is_complete_output(a)
    assert not (b / "checkpoint").exists()  # the finished output replaced the folder with its checkpoint

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if wa[k].dtype != wb[k].dtype or _bits(wa[k]) != _bits(wb[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"

    # The resumed report covers every layer exactly once.
    layers = [r["name"] for r in json.loads((b / "report.json").read_text())["layers"]]
    assert len(layers) == len(set(layers)) == 7 * N_BLOCKS


# ---- issue 14 item 4: resume with another batch size, model, evaluation; resume without --output ----------

FAST = ["--method", "wanda", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny 3-block Llama, a second one of the same shape (other seed, same tokenizer), a corpus."""
    from cli_helpers import make_corpus, make_model_dir

    root = tmp_path_factory.mktemp("resume-cli")
    torch.set_num_threads(1)
    model = make_model_dir(root / "model")
    other = root / "other"
    other.mkdir()
    twin = make_tiny_model("llama", seed=7, vocab_size=len(_tokenizer()), tie_word_embeddings=True)
    twin.save_pretrained(other)
    _tokenizer().save_pretrained(other)
    calib, held_out = make_corpus(root / "corpus")
    return {"model": str(model), "other": str(other), "calib": str(calib), "eval": str(held_out)}


def _tokenizer():
    from alpsprune.io import load_tokenizer

    return load_tokenizer(None)


def _argv(small: dict[str, str], *extra: str, model: str = "model", evaluate: bool = False) -> list[str]:
    ev = ["--eval", small["eval"], "--max-windows", "1"] if evaluate else ["--eval", "none"]
    return ["prune", small[model], "--calib", small["calib"], *ev, *FAST, *extra]


def test_resume_with_another_batch_size_rebatches(small, tmp_path, monkeypatch) -> None:
    from safety_helpers import run_cli, run_interrupted

    out = tmp_path / "out"
    run_interrupted(_argv(small, "--output", str(out), "--batch-size", "1"), monkeypatch)
    code, _, err = run_cli(_argv(small, "--output", str(out), "--batch-size", "2", "--resume"))
    assert code == 0, err  # used to crash: the kwargs were batched by 2, the saved inputs by 1
    report = json.loads((out / "report.json").read_text())
    assert len({r["name"] for r in report["layers"]}) == len(report["layers"]) == 21
    assert abs(report["summary"]["targeted_sparsity"] - 0.6) < 1e-3  # wanda rounds per row


def test_resume_with_another_model_is_refused(small, tmp_path, monkeypatch) -> None:
    from safety_helpers import error_lines, run_cli, run_interrupted

    out = tmp_path / "out"
    run_interrupted(_argv(small, "--output", str(out)), monkeypatch)
    code, _, err = run_cli(_argv(small, "--output", str(out), "--resume", model="other"))
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "different model" in lines[0]
    assert not is_complete_output(out) and (out / "checkpoint" / "state.json").exists()


def test_dense_eval_is_reused_only_with_the_same_evaluation(small, tmp_path, monkeypatch) -> None:
    from safety_helpers import run_cli, run_interrupted

    from alpsprune.cli import prune as prune_cli

    out = tmp_path / "out"
    run_interrupted(_argv(small, "--output", str(out), evaluate=True), monkeypatch)
    calls: list[int | None] = []
    real_evaluate = prune_cli.evaluate

    def counting(model, tokenizer, eval_data, seqlen, max_windows, *a):
        calls.append(max_windows)
        return real_evaluate(model, tokenizer, eval_data, seqlen, max_windows, *a)

    monkeypatch.setattr(prune_cli, "evaluate", counting)
    argv = _argv(small, "--output", str(out), "--resume", evaluate=True)
    argv[argv.index("--max-windows") + 1] = "2"  # other evaluation settings than the killed run's
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert calls == [2, 2]  # dense evaluated again (not reused from the 1-window run), then pruned
    ppl = json.loads((out / "report.json").read_text())["extra"]["perplexity"]
    assert ppl["dense"][small["eval"]]["windows"] == 2 == ppl["pruned"][small["eval"]]["windows"]

    run_interrupted(_argv(small, "--output", str(tmp_path / "same"), evaluate=True), monkeypatch)
    calls.clear()
    code, _, err = run_cli(_argv(small, "--output", str(tmp_path / "same"), "--resume", evaluate=True))
    assert code == 0, err
    assert calls == [1]  # same model and evaluation: the dense result is reused


def test_resume_without_output_finds_the_unfinished_run(small, tmp_path, monkeypatch) -> None:
    from safety_helpers import run_cli, run_interrupted

    monkeypatch.chdir(tmp_path)
    run_interrupted(_argv(small), monkeypatch)  # default output: runs/<time>-model-wanda-0.6
    (started,) = list((tmp_path / "runs").iterdir())
    code, stdout, err = run_cli(_argv(small, "--resume"))  # "the same command plus --resume"
    assert code == 0, err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [started.name]
    assert is_complete_output(started) and str(started.relative_to(tmp_path)) in stdout


def test_checkpoint_rebatches_and_reshards(tmp_path) -> None:
    """Inputs saved per window by 2 ranks load as any batch size on any number of ranks, exactly."""
    from alpsprune.checkpoint import Checkpointer, load_checkpoint
    from alpsprune.parallel import Distributed, Parallel
    from alpsprune.report import PruneReport

    class Rank(Parallel):  # a rank of a world without a process group (shards like Distributed)
        def __init__(self, rank: int, world: int, counts: list[int] | None = None):
            self.rank, self.world_size, self.counts = rank, world, counts

        shard, _bounds = Distributed.shard, Distributed._bounds

        def gather_list(self, items):
            return self.counts if self.is_main else []

    calibration = torch.arange(5 * 8).reshape(5, 8)
    hidden = torch.randn(5, 8, 4, generator=torch.Generator().manual_seed(0))
    dense = hidden * 2
    settings = {"method": "wanda"}
    ckpt = Checkpointer(tmp_path / "ck", settings, calibration)
    writers = [Rank(1, 2), Rank(0, 2, counts=[3, 2])]  # batch size 1: rank 0 holds windows 0-2, rank 1 3-4
    for p in writers:
        start, stop = (0, 3) if p.rank == 0 else (3, 5)
        mine = list(torch.split(hidden[start:stop], 1))
        ckpt.save(0, {}, mine, [d * 2 for d in mine], PruneReport(settings=settings), p)
    for world, batch in [(1, 2), (1, 5), (3, 1), (2, 2)]:
        got = []
        for rank in range(world):
            state = load_checkpoint(tmp_path / "ck", settings, calibration, None, Rank(rank, world), batch)
            assert all(h.shape[0] <= batch for h in state.hidden)
            assert len(state.hidden) == len(state.dense)
            got.append(torch.cat(state.hidden))
            windows = Rank(rank, world).shard(torch.arange(5).unsqueeze(1), batch)[:, 0]
            assert torch.equal(torch.cat(state.hidden), hidden[windows])
            assert torch.equal(torch.cat(state.dense), dense[windows])
        assert torch.equal(torch.cat(got), hidden)
