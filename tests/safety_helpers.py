"""Helpers of the folder-safety and resume tests: the CLI in-process, a run killed after its first
committed block, and byte-for-byte snapshots of folders."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from alpsprune.cli.main import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``alpsprune ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return code, out.getvalue(), err.getvalue()


def run_interrupted(argv: list[str], monkeypatch: pytest.MonkeyPatch, after_block: int = 0) -> None:
    """Run ``argv`` and stop it like Ctrl-C right after block ``after_block`` is committed to the checkpoint."""
    from alpsprune import checkpoint

    real_save = checkpoint.Checkpointer.save

    def save_then_stop(self, index, *args, **kwargs):
        real_save(self, index, *args, **kwargs)
        if index == after_block:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpointer, "save", save_then_stop)
        code, _, err = run_cli(argv)
    assert code == 130, err


def add_foreign_files(folder: Path) -> dict[str, bytes]:
    """A user's files: `thesis.tex` and `data/x.csv`. Returns the snapshot they must keep."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text(
        "\\documentclass{article}\n\\begin{document}Years of work.\\end{document}\n"
    )
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "x.csv").write_bytes(b"a,b\n1,2\n3,4\n")
    return {name: data for name, data in snapshot(folder).items() if name in ("thesis.tex", "data/x.csv")}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def error_lines(stderr: str, command: str = "prune") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"alpsprune {command}")]
