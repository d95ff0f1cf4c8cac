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
