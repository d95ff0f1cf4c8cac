"""What a pruned output folder holds (issue 17, "Outputs"): weights in the dtype the model declares (or
`--save-dtype`), a clean config.json, a Hub model card, and `--push-to-hub` through huggingface_hub."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import make_tiny_model, tiny_input_ids
from transformers import AutoModelForCausalLM

from alpsprune import io
from alpsprune.errors import OutputError


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny_input_ids(2, 16), use_cache=False).logits


def _saved_dtypes(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.fixture
def bf16_checkpoint(tmp_path: Path, bundled_tokenizer) -> Path:
    """A tiny Llama checkpoint that declares (and stores) bfloat16, like most Hub LLMs."""
    folder = tmp_path / "bf16"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    bundled_tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


# --- dtype -------------------------------------------------------------------------------------------------


def test_declared_dtype_survives_a_float32_load_and_is_saved(bf16_checkpoint: Path, tmp_path: Path) -> None:
    """Pruning on a CPU loads in float32; the output must come back in the checkpoint's bfloat16, half the
    size, and score exactly what the rounded in-memory model scores."""
    model, _ = io.load_model(bf16_checkpoint, dtype="float32")
    assert model.dtype == torch.float32 and io.declared_dtype(model) == torch.bfloat16
    with torch.no_grad():  # "pruning" that leaves values bfloat16 cannot hold
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)

    out32 = io.save_pruned(model, None, tmp_path / "f32", save_dtype="float32")
    out = io.save_pruned(model, None, tmp_path / "auto")
    assert _saved_dtypes(out) == {"BF16"} and _saved_dtypes(out32) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    ratio = (out / "model.safetensors").stat().st_size / (out32 / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52
    assert model.dtype == torch.float32 and model.config.dtype == torch.float32  # the caller's model untouched

    attn = model.config._attn_implementation  # the same attention kernel, so the same code path
    # reloaded in float32: bit-identical to the in-memory model rounded to bfloat16 (same code path)
    rounded = copy.deepcopy(model)
    assert io.round_to_dtype(rounded, torch.bfloat16) > 0
    assert io.round_to_dtype(rounded, torch.bfloat16) == 0  # idempotent
    reloaded32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation=attn).eval()
    for key, value in rounded.state_dict().items():
        assert torch.equal(reloaded32.state_dict()[key], value), key
    assert torch.equal(_logits(reloaded32), _logits(rounded))
    assert not torch.equal(_logits(rounded), _logits(model))  # the rounding was real
    # reloaded as transformers does by default (the declared bfloat16): the in-memory model cast to it
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation=attn).eval()
    cast = copy.deepcopy(model).to(torch.bfloat16)
    for name, buffer in model.named_buffers():  # transformers keeps non-saved buffers (rotary) in float32
        if name not in cast.state_dict():
            owner, _, attr = name.rpartition(".")
            setattr(cast.get_submodule(owner), attr, buffer.clone())
    assert reloaded.dtype == torch.bfloat16
    for key, value in cast.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert torch.equal(_logits(reloaded), _logits(cast))


def test_tied_weights_stay_tied_when_cast(tmp_path: Path) -> None:
    model = make_tiny_model("gpt2")  # GPT-2 ties lm_head to the token embedding
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    out = io.save_pruned(model, None, tmp_path / "o", save_dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, model.transformer.wte.weight.to(torch.bfloat16).float())


def test_save_dtype_errors(tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    with pytest.raises(OutputError, match="unknown save dtype 'int8'"):
        io.save_pruned(model, None, tmp_path / "a", save_dtype="int8")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6  # beyond float16's 65504
    with pytest.raises(OutputError, match="down_proj.weight has values outside float16's range"):
        io.save_pruned(model, None, tmp_path / "b", save_dtype="float16")
    assert not (tmp_path / "b").exists()


def test_gguf_declared_dtype_from_the_header(tmp_path: Path) -> None:
    """general.file_type, read past string arrays and other keys, against files written by gguf itself."""
    import gguf

    def write(name: str, file_type: int | None) -> Path:
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_name("Some Model")
        w.add_token_list(["<s>", "hello", "wörld"])  # an array of strings before the key
        w.add_array("test.numbers", [1.5, 2.5, 3.5])
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    for file_type, expected in [(0, torch.float32), (1, torch.float16), (32, torch.bfloat16), (3, torch.bfloat16)]:
        path = write(f"t{file_type}.gguf", file_type)
        field = gguf.GGUFReader(str(path)).fields["general.file_type"]
        assert int(field.parts[field.data[0]][0]) == io._gguf_file_type(path) == file_type
        assert io.gguf_declared_dtype(path) == expected
    assert io._gguf_file_type(write("none.gguf", None)) is None
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")  # truncated
    assert io._gguf_file_type(tmp_path / "junk.gguf") is None


@pytest.mark.slow
def test_bundled_model_saves_bfloat16_without_gguf_name(tmp_path: Path) -> None:
    model, tokenizer = io.load_model(None)
    assert model.dtype == torch.float32 and io.declared_dtype(model) == torch.bfloat16
    out = io.save_pruned(model, tokenizer, tmp_path / "o")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "_model_name_or_path" not in config
    assert _saved_dtypes(out) == {"BF16"}
    # 134.5 M parameters (embedding tied, stored once) at 2 bytes, plus the JSON header
    stored = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    size = (out / "model.safetensors").stat().st_size
    assert 2 * stored < size < 2 * stored + 100_000
