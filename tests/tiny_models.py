"""Tiny random-weight causal LMs built from real transformers config classes.

Shared by the model-layer and pipeline tests: every architecture alpsprune claims to support gets one
factory entry, sized so a full forward takes milliseconds. All linear in-features are multiples of 8, so
2:4 and 4:8 patterns fit every target layer; head_dim is 16 so rotary code paths behave as in real models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn

from alpsprune.models import capture_block_inputs, find_decoder_blocks, run_block

HIDDEN = 64  # in-features of q/k/v/o, gate/up, fc1
INTERMEDIATE = 128  # in-features of down_proj / fc2
HEADS = 4  # head_dim = 64 / 4 = 16
LAYERS = 3
VOCAB = 256
MAX_POS = 128


def _llama() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
    )


def _qwen2() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
    )


def _qwen3() -> transformers.PretrainedConfig:
    return transformers.Qwen3Config(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
    )


def _mistral() -> transformers.PretrainedConfig:
    # A sliding window shorter than the test sequences, so the window mask really matters.
    return transformers.MistralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        sliding_window=6,
    )


def _gemma3() -> transformers.PretrainedConfig:
    # Layers 0-1 slide over 6 tokens, layer 2 is global; each type has its own mask and rotary tables.
    return transformers.Gemma3TextConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )


def _phi3() -> transformers.PretrainedConfig:
    return transformers.Phi3Config(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        original_max_position_embeddings=MAX_POS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _opt() -> transformers.PretrainedConfig:
    return transformers.OPTConfig(
        hidden_size=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        word_embed_proj_dim=HIDDEN,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


def _gpt2() -> transformers.PretrainedConfig:
    return transformers.GPT2Config(
        n_embd=HIDDEN,
        n_inner=INTERMEDIATE,
        n_layer=LAYERS,
        n_head=HEADS,
        vocab_size=VOCAB,
        n_positions=MAX_POS,
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt_neox() -> transformers.PretrainedConfig:
    return transformers.GPTNeoXConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        rotary_pct=0.5,
        bos_token_id=0,
        eos_token_id=0,
    )


_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "opt": _opt,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
}

ARCHS: list[str] = list(_CONFIGS)

# Target linears per decoder block with the default selection (every nn.Linear / Conv1D in the block).
LINEARS_PER_BLOCK: dict[str, int] = {
    "llama": 7,
    "qwen2": 7,
    "qwen3": 7,
    "mistral": 7,
    "gemma3": 7,
    "phi3": 4,  # fused qkv_proj and gate_up_proj
    "opt": 6,
    "gpt2": 4,  # Conv1D c_attn, attn.c_proj, c_fc, mlp.c_proj
    "gpt_neox": 4,  # fused query_key_value, dense, dense_h_to_4h, dense_4h_to_h
}


def make_tiny_config(arch: str) -> transformers.PretrainedConfig:
    """The config alone, for tests that build models their own way."""
    try:
        return _CONFIGS[arch]()
    except KeyError:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHS}") from None


def make_tiny_model(arch: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A float32 eval-mode causal LM with seeded random weights and eager attention (deterministic on CPU)."""
    config = make_tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def tiny_input_ids(n: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token windows `(n, seqlen)` drawn from the tiny vocabulary (ids ≥ 3, avoiding special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=generator)


def logits_from_final_hidden(model: nn.Module, input_ids: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """The model's own post-block path (final norm, projections, head, softcapping) applied to `final`:
    blocks are swapped for pass-throughs and the last one returns `final`."""
    _, blocks = find_decoder_blocks(model)
    for block in blocks:
        block.forward = lambda hidden, *a, **k: hidden
    blocks[-1].forward = lambda *a, **k: final
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward


def blockwise_logits(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits computed the pipeline's way: capture block-0 inputs, run every block with `run_block`, then
    the model's own head. Must equal `model(input_ids).logits`."""
    inputs = capture_block_inputs(model, input_ids, "cpu", batch_size=batch_size)
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        for index, block in enumerate(blocks):
            inputs.hidden = [
                run_block(block, h, inputs.kwargs_for(index, j)) for j, h in enumerate(inputs.hidden)
            ]
    logits = []
    for j, final in enumerate(inputs.hidden):
        start = j * batch_size
        logits.append(logits_from_final_hidden(model, input_ids[start : start + final.shape[0]], final))
    return torch.cat(logits)
