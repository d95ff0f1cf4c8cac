"""bench/deploy.py (issue 17, deployment): every sparse format computes the dense product, the storage
layouts' byte counts are exact, and a small run writes the documented JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "deploy.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("deploy_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ell_format_and_masks() -> None:
    deploy = load_bench()
    gen = torch.Generator().manual_seed(0)
    mask = deploy.random_mask(32, 48, 0.75, gen)
    assert int(mask.sum()) == round(0.25 * 32 * 48)
    nm = deploy.nm_mask(32, 48, 2, 4, gen)
    assert (nm.view(32, 12, 4).sum(-1) == 2).all()
    w = torch.randn(32, 48, generator=gen) * mask
    values, cols = deploy.ell_format(w)
    assert values.shape[1] == int(mask.sum(1).max())
    x = torch.randn(3, 48, generator=gen)
    torch.testing.assert_close(deploy.ell_apply(values, cols, x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_layout_bytes_are_exact() -> None:
    deploy = load_bench()
    w = torch.zeros(10, 20, dtype=torch.bfloat16)
    w[0, :7] = 1.0
    w[3, 5] = -2.0
    sizes = deploy.layout_bytes(w)
    assert sizes == {"dense": 400, "bitmask": 8 * 2 + math.ceil(200 / 8), "csr_int16": 8 * 4 + 11 * 4}


def test_small_run_writes_json(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "deploy.json"
    argv = ["deploy.py", "--shape", "64x128", "--sparsities", "0.7,2:4", "--batches", "1,2", "--repeats", "1",
            "--output", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        load_bench().main()  # asserts inside that every format matches the dense product
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert [(r["batch"], r["pattern"]) for r in data["speed"]] == [
        (1, "0.7"),
        (1, "2:4"),
        (2, "0.7"),
        (2, "2:4"),
    ]
    assert "torch_ell_ms" in data["speed"][0] and "torch_ell_ms" not in data["speed"][2]
    assert [r["pattern"] for r in data["storage"]] == ["0", "0.7", "2:4"]
    at70 = data["storage"][1]
    assert abs(at70["bitmask"] - (0.3 * 2 + 1 / 8) / 2) < 1e-3  # kept values + 1 bit per weight, over 2 B
