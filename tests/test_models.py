"""Block discovery, target selection, weight access and block-input capture on every tiny architecture."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import ARCHS, LAYERS, LINEARS_PER_BLOCK, blockwise_logits, make_tiny_model, tiny_input_ids
from torch import nn

from alpsprune.errors import ModelError, TargetError
from alpsprune.models import (
    BlockInputs,
    Conv1D,
    capture_block_inputs,
    find_decoder_blocks,
    find_target_linears,
    get_weight,
    list_target_layers,
    require_targets,
    run_block,
    set_weight,
    weight_shape,
)
from alpsprune.models.capture import _move_outside_blocks

BLOCK_PATHS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "mistral": "model.layers",
    "gemma3": "model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


# --- discovery -----------------------------------------------------------------------------------------


def test_find_decoder_blocks(arch: str, tiny_model: nn.Module) -> None:
    path, blocks = find_decoder_blocks(tiny_model)
    assert path == BLOCK_PATHS[arch]
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == LAYERS
    assert tiny_model.get_submodule(path) is blocks


def test_default_targets_per_architecture(arch: str, tiny_model: nn.Module) -> None:
    layers = list_target_layers(tiny_model)
    assert len(layers) == LAYERS * LINEARS_PER_BLOCK[arch]
    for name, module in layers.items():
        assert tiny_model.get_submodule(name) is module
        assert not isinstance(module, (nn.Embedding, nn.LayerNorm))
        assert "lm_head" not in name and "embed" not in name
        # Every in-feature count fits 2:4 and 4:8 patterns.
        assert weight_shape(module)[1] % 8 == 0


def test_blocks_refused_for_non_causal_models() -> None:
    bert = pytest.importorskip("transformers").BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    from transformers import AutoModel

    with pytest.raises(ModelError, match="not a decoder-only causal"):
        find_decoder_blocks(AutoModel.from_config(bert))
    with pytest.raises(ModelError):
        find_decoder_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_regex_targets_and_ignore(tiny_llama: nn.Module) -> None:
    attn = list_target_layers(tiny_llama, targets=[r"self_attn\."])
    assert len(attn) == 4 * LAYERS and all("self_attn" in n for n in attn)
    no_v = list_target_layers(tiny_llama, targets=[r"self_attn\."], ignore=[r"v_proj$"])
    assert len(no_v) == 3 * LAYERS and not any(n.endswith("v_proj") for n in no_v)
    block1 = list_target_layers(tiny_llama, targets=[r"layers\.1\.mlp"])
    assert sorted(block1) == [f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    _, blocks = find_decoder_blocks(tiny_llama)
    one = find_target_linears(blocks[2], "model.layers.2", targets=["q_proj", "k_proj"])
    assert list(one) == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj"]


def test_require_targets_errors(tiny_llama: nn.Module) -> None:
    assert len(require_targets(tiny_llama)) == 7 * LAYERS
    with pytest.raises(
        TargetError, match=r"'no_such_layer' matches no module.*model\.layers\.0\.self_attn\.q_proj"
    ):
        require_targets(tiny_llama, targets=["no_such_layer"])
    with pytest.raises(TargetError, match=r"select no layer.*model\.layers\.0\.self_attn\.q_proj"):
        require_targets(tiny_llama, targets=["embed_tokens"])  # a module, but not a linear in the blocks
    with pytest.raises(TargetError, match="select no layer"):
        require_targets(tiny_llama, ignore=[".*"])
    with pytest.raises(TargetError, match="invalid targets regex"):
        require_targets(tiny_llama, targets=["("])


def test_gpt2_conv1d_targets() -> None:
    model = make_tiny_model("gpt2")
    layers = list_target_layers(model)
    assert all(isinstance(m, Conv1D) for m in layers.values())
    assert weight_shape(layers["transformer.h.0.attn.c_attn"]) == (3 * 64, 64)
    assert weight_shape(layers["transformer.h.0.mlp.c_proj"]) == (64, 128)


# --- weights -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weight_round_trip(arch: str) -> None:
    model = make_tiny_model(arch)
    x = torch.randn(3, 64)
    for name, module in list_target_layers(model, targets=[r"\.0\."]).items():
        W = get_weight(module)
        assert W.shape == weight_shape(module), name
        # (out, in) convention: x @ W.T (+ bias) is the layer's own output.
        bias = module.bias if module.bias is not None else 0
        if W.shape[1] == 64:
            torch.testing.assert_close(module(x), x @ W.T + bias)
        W[:, ::2] = 0  # a copy: the module must be untouched until set_weight
        assert not torch.equal(get_weight(module), W)
        set_weight(module, W)
        torch.testing.assert_close(get_weight(module), W, rtol=0, atol=0)


def test_set_weight_keeps_dtype_and_checks_shape(tiny_llama: nn.Module) -> None:
    module = tiny_llama.model.layers[0].mlp.down_proj.to(torch.bfloat16)
    W = get_weight(module).double()
    set_weight(module, torch.zeros_like(W))
    assert module.weight.dtype == torch.bfloat16 and not module.weight.any()
    with pytest.raises(ValueError, match="does not match"):
        set_weight(module, W.t())


# --- capture and run -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2])
def test_blockwise_forward_reproduces_logits(arch: str, tiny_model: nn.Module, batch_size: int) -> None:
    """The KEY contract for the pipeline: capture + run_block per block == the model's own forward."""
    input_ids = tiny_input_ids(5, 16)  # 5 samples: batch_size 2 leaves a smaller last batch
    with torch.no_grad():
        expected = tiny_model(input_ids=input_ids, use_cache=False).logits
    actual = blockwise_logits(tiny_model, input_ids, batch_size)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_blockwise_forward_with_sdpa(arch: str) -> None:
    """With SDPA the causal mask is often None (is_causal) except for sliding layers; both must work."""
    model = make_tiny_model(arch)
    model.set_attn_implementation("sdpa")
    input_ids = tiny_input_ids(3, 16)
    with torch.no_grad():
        expected = model(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(blockwise_logits(model, input_ids, 2), expected, rtol=1e-5, atol=1e-5)


def test_gemma3_blocks_get_their_layer_type_arguments() -> None:
    """Sliding-window and global layers receive different masks and rotary tables; both must be kept."""
    model = make_tiny_model("gemma3")
    inputs = capture_block_inputs(model, tiny_input_ids(2, 16), "cpu", batch_size=2)
    sliding, sliding2, full = (inputs.kwargs_for(i) for i in range(3))
    assert sliding["attention_mask"] is sliding2["attention_mask"]  # shared, not duplicated
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    # Running the global layer with block 0's arguments would give a different answer.
    h = inputs.hidden[0]
    block = find_decoder_blocks(model)[1][2]
    with torch.no_grad():
        assert not torch.allclose(run_block(block, h, full), run_block(block, h, inputs.kwargs))


def test_capture_contents(tiny_llama: nn.Module, input_ids: torch.Tensor) -> None:
    inputs = capture_block_inputs(tiny_llama, input_ids, "cpu", batch_size=2)
    assert isinstance(inputs, BlockInputs) and inputs.n_blocks == LAYERS
    assert [tuple(h.shape) for h in inputs.hidden] == [(2, 16, 64), (2, 16, 64)]
    with torch.no_grad():
        torch.testing.assert_close(inputs.hidden[1], tiny_llama.model.embed_tokens(input_ids[2:]))
    kwargs = inputs.kwargs
    assert kwargs["use_cache"] is False and kwargs["cache"] is None
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape == sin.shape and cos.shape[-2:] == (16, 16)  # (1 or b, seqlen, head_dim)
    assert "forward" not in tiny_llama.model.layers[0].__dict__  # recorders removed
    assert inputs.kwargs_for(1) is not inputs.kwargs_for(1)  # fresh dicts, safe to mutate


def test_capture_records_positional_block_arguments() -> None:
    """GPT-2 passes cache and mask positionally; they come back as keyword arguments."""
    model = make_tiny_model("gpt2")
    kwargs = capture_block_inputs(model, tiny_input_ids(1, 16), "cpu").kwargs
    assert {"cache", "attention_mask", "encoder_hidden_states", "use_cache"} <= set(kwargs)
    assert kwargs["cache"] is None


def test_capture_store_device_and_to(tiny_llama: nn.Module, input_ids: torch.Tensor) -> None:
    inputs = capture_block_inputs(tiny_llama, input_ids, "cpu", batch_size=4, store_device="cpu")
    moved = inputs.to("cpu")
    assert moved.kwargs_for(0)["attention_mask"] is moved.kwargs_for(2)["attention_mask"]
    torch.testing.assert_close(moved.hidden[0], inputs.hidden[0])


def test_moving_outside_blocks_is_undone_exactly(arch: str, tiny_model: nn.Module) -> None:
    """Embeddings/rotary/head go to the device and come back as the same objects; blocks never move."""
    path, blocks = find_decoder_blocks(tiny_model)
    before = {name: id(p) for name, p in tiny_model.named_parameters(remove_duplicate=False)}
    buffers = {name: id(b) for name, b in tiny_model.named_buffers()}
    restore = _move_outside_blocks(tiny_model, path, torch.device("meta"))
    try:
        for name, p in tiny_model.named_parameters(remove_duplicate=False):
            assert p.is_meta == (not name.startswith(path + ".")), name
        if tiny_model.config.tie_word_embeddings:
            assert tiny_model.get_output_embeddings().weight is tiny_model.get_input_embeddings().weight
    finally:
        restore()
    assert before == {name: id(p) for name, p in tiny_model.named_parameters(remove_duplicate=False)}
    assert buffers == {name: id(b) for name, b in tiny_model.named_buffers()}


def test_failed_capture_restores_model(tiny_llama: nn.Module, input_ids: torch.Tensor) -> None:
    """A forward that fails on the device (here: meta tensors cannot run) leaves the model as it was."""
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(Exception):  # noqa: B017 - whatever the device raises
        capture_block_inputs(tiny_llama, input_ids, "meta")
    assert all(p.device.type == "cpu" for p in tiny_llama.parameters())
    assert all("forward" not in b.__dict__ for b in tiny_llama.model.layers)
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_capture_rejects_bad_arguments(tiny_llama: nn.Module) -> None:
    with pytest.raises(ValueError, match="seqlen"):
        capture_block_inputs(tiny_llama, torch.zeros(16, dtype=torch.long), "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        capture_block_inputs(tiny_llama, torch.zeros(2, 16, dtype=torch.long), "cpu", batch_size=0)


def test_run_block_accepts_tuple_outputs() -> None:
    class TupleBlock(nn.Module):
        def forward(self, hidden: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
            return hidden * 2, None

    h = torch.ones(1, 2, 3)
    torch.testing.assert_close(run_block(TupleBlock(), h, {}), 2 * h)


def test_all_archs_listed() -> None:
    assert set(ARCHS) == set(BLOCK_PATHS) == set(LINEARS_PER_BLOCK)
