"""`alpsprune inspect` (issue 17): per-tensor sparsity, N:M detection and overall figures of saved
checkpoints, read tensor by tensor from safetensors without building a model, checked against counts
computed independently on the full tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_cli import run_cli
from tiny_models import make_tiny_model

from alpsprune.inspection import InspectError, inspect_checkpoint


def nm_mask(rows: int, cols: int, n: int, m: int, seed: int) -> torch.Tensor:
    """Exactly n kept at random positions in every m consecutive entries of each row."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols // m, m, generator=g)
    keep = scores.argsort(-1, descending=True)[..., :n]
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def random_mask(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) >= sparsity


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """One file with known patterns: 2:4, 4:8 (not 2:4), 1:4, 90% unstructured, 2:4 along the first axis
    (Conv1D layout), dense, a 1-D norm, a 3-D stacked-experts 2:4 tensor, bf16, and an int tensor."""
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) + 3.0  # no accidental zeros

    tensors = {
        "a.nm24.weight": w(64, 128) * nm_mask(64, 128, 2, 4, 1),
        "b.nm48.weight": w(32, 64) * nm_mask(32, 64, 4, 8, 2),
        "c.nm14.weight": (w(48, 96) * nm_mask(48, 96, 1, 4, 3)).to(torch.bfloat16),
        "d.unstructured.weight": w(256, 512) * random_mask(256, 512, 0.9, 4),
        "e.conv1d.weight": (w(64, 32).t() * nm_mask(32, 64, 2, 4, 5)).t().contiguous(),
        "f.dense.weight": w(40, 24),
        "g.norm.weight": torch.cat([torch.zeros(3), w(13)]),
        "h.experts.weight": w(3, 16, 32) * nm_mask(48, 32, 2, 4, 6).reshape(3, 16, 32),
        "i.qweight": torch.arange(12, dtype=torch.int32).reshape(3, 4),
    }
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("chunk", [1 << 24, 16 * 64])  # whole tensors, and chunks of 16 rows
def test_counts_and_patterns_match_independent_computation(crafted, chunk: int) -> None:
    path, tensors = crafted
    result = inspect_checkpoint(path, chunk_elements=chunk)
    found = {t.name: t for t in result.tensors}
    assert set(found) == set(tensors) - {"i.qweight"}
    assert result.skipped == [{"name": "i.qweight", "dtype": "I32", "why": "not a float tensor"}]
    for name, tensor in found.items():
        assert tensor.zeros == int((tensors[name] == 0).sum()), name
        assert tensor.shape == tuple(tensors[name].shape)
    expected = {
        "a.nm24.weight": ("2:4", 1),
        "b.nm48.weight": ("4:8", 1),
        "c.nm14.weight": ("1:4", 1),
        "d.unstructured.weight": (None, None),
        "e.conv1d.weight": ("2:4", 0),
        "f.dense.weight": (None, None),
        "g.norm.weight": (None, None),
        "h.experts.weight": ("2:4", 1),
    }
    assert {n: (t.nm, t.nm_axis) for n, t in found.items()} == expected
    assert found["c.nm14.weight"].dtype == "BF16"
    assert abs(found["d.unstructured.weight"].sparsity - 0.9) < 0.01

    s = result.summary
    float_tensors = [t for n, t in tensors.items() if t.is_floating_point()]
    assert s["all"]["parameters"] == sum(t.numel() for t in float_tensors)
    assert s["all"]["zeros"] == sum(int((t == 0).sum()) for t in float_tensors)
    sparse = ["a.nm24.weight", "b.nm48.weight", "c.nm14.weight", "d.unstructured.weight", "e.conv1d.weight",
              "h.experts.weight"]  # fmt: skip
    assert s["sparse_matrices"]["tensors"] == len(sparse)
    assert s["sparse_matrices"]["zeros"] == sum(int((tensors[n] == 0).sum()) for n in sparse)
    assert s["sparse_matrices"]["patterns"] == {"2:4": 3, "4:8": 1, "1:4": 1, "unstructured": 1}
    assert s["pattern"] is None  # mixed


def test_unstructured_chance_maxima_are_not_patterns(tmp_path: Path) -> None:
    """At 90% unstructured no 16-group may exceed 8 non-zeros by chance, yet it is no 8:16 mask; and a 2:4
    mask with a few extra zeros (a kept weight that happened to be 0) is still 2:4."""
    g = torch.Generator().manual_seed(0)
    small = torch.randn(16, 32, generator=g) * random_mask(16, 32, 0.9, 1)
    nm = (torch.randn(64, 64, generator=g) + 3) * nm_mask(64, 64, 2, 4, 2)
    nm[0, :8] = 0
    save_file({"small": small, "nm": nm}, str(tmp_path / "m.safetensors"))
    found = {t.name: t.nm for t in inspect_checkpoint(tmp_path / "m.safetensors").tensors}
    assert found == {"small": None, "nm": "2:4"}


def test_sharded_checkpoint_of_a_pruned_model(tmp_path: Path) -> None:
    """A tiny model pruned to 2:4 by alpsprune and saved in shards with an index: every targeted linear is
    2:4 and the figures equal those of the loaded state dict; no config is needed (nothing is built)."""
    import alpsprune

    model = make_tiny_model("llama")
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    report = alpsprune.prune_model(model, calib, method="magnitude", mask_structure="2:4", progress=False)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    assert index.is_file() and len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    (tmp_path / "m" / "config.json").unlink()

    result = inspect_checkpoint(tmp_path / "m")
    pruned = {r.name + ".weight" for r in report.layers}
    found = {t.name: t for t in result.tensors}
    assert {n for n, t in found.items() if t.nm == "2:4"} == pruned
    state = model.state_dict()
    for name, tensor in found.items():
        assert tensor.zeros == int((state[name] == 0).sum()), name
    assert result.pattern == "2:4" and result.summary["sparse_matrices"]["sparsity"] == 0.5
    assert len(result.files) == len(set(json.loads(index.read_text())["weight_map"].values()))
    assert inspect_checkpoint(index).summary == result.summary  # the index file itself works too


def test_cli_table_json_and_errors(crafted, tmp_path: Path) -> None:
    path, tensors = crafted
    code, stdout, stderr = run_cli(["inspect", str(path)])
    assert code == 0, stderr
    assert "a.nm24.weight" in stdout and "g.norm.weight" not in stdout  # 1-D only with --all
    assert "6 of 7 matrices are pruned" in stdout and "not counted: 1 non-float tensor" in stdout
    assert "2:4 (axis 0)" in stdout
    code, stdout, _ = run_cli(["inspect", str(path), "--all"])
    assert "g.norm.weight" in stdout
    code, stdout, _ = run_cli(["inspect", str(path), "--json"])
    data = json.loads(stdout)
    assert data["summary"]["sparse_matrices"]["patterns"]["2:4"] == 3
    assert {t["name"]: t["nm"] for t in data["tensors"]}["b.nm48.weight"] == "4:8"

    (tmp_path / "empty").mkdir()
    for target, message in [
        (tmp_path / "nothing", "does not exist"),
        (tmp_path / "empty", "no .safetensors files"),
    ]:
        code, _, stderr = run_cli(["inspect", str(target)])
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    code, _, stderr = run_cli(["inspect", str(tmp_path / "bin")])
    assert code == 2 and "save_pretrained it as safetensors" in stderr
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InspectError, match="cannot read"):
        inspect_checkpoint(tmp_path / "broken.safetensors")
