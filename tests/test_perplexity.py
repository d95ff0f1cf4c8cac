"""Perplexity equals an independent computation on the same windows."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import make_tiny_model

import alpsprune
from alpsprune.data import eval_tokens, eval_windows
from alpsprune.evaluation import PerplexityResult, perplexity


@pytest.fixture(scope="module")
def tok(bundled_tokenizer):
    return bundled_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)


def reference_ppl(model, windows: torch.Tensor) -> float:
    """Independent loop: log-softmax, gather the next token, mean over all predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(row.numel() - 1):
                total -= float(logp[t, row[t + 1]])
                count += 1
    return math.exp(total / count)


def test_matches_reference_loop(model, tok):
    tokens = eval_tokens("wiki-excerpt", tok)[: 5 * 128 + 50]
    windows = eval_windows(tokens, seqlen=128)
    assert windows.shape == (5, 128)
    ref = reference_ppl(model, windows)
    for bs in (1, 2):
        res = perplexity(model, tok, tokens, seqlen=128, batch_size=bs, progress=False)
        assert isinstance(res, PerplexityResult)
        assert res.windows == 5 and res.tokens == 5 * 127 and res.seqlen == 128
        assert math.isclose(res.ppl, ref, rel_tol=1e-5)
        assert math.isclose(float(res), ref, rel_tol=1e-5)
        assert math.isclose(res.nll, math.log(ref), rel_tol=1e-5)


def test_source_names_paths_and_max_windows(model, tok, tmp_path):
    text = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(120))
    f = tmp_path / "eval.txt"
    f.write_text(text, encoding="utf-8")
    ids = eval_tokens(str(f), tok)
    assert ids.tolist() == tok(text)["input_ids"]  # joined with "\n\n", tokenized once
    from_path = perplexity(model, tok, str(f), seqlen=64, progress=False)
    from_ids = perplexity(model, tok, ids, seqlen=64, progress=False)
    assert from_path.windows == ids.numel() // 64 and from_path.ppl == from_ids.ppl
    short = perplexity(model, tok, str(f), seqlen=64, max_windows=2, progress=False)
    assert short.windows == 2
    assert math.isclose(short.ppl, reference_ppl(model, eval_windows(ids, seqlen=64)[:2]), rel_tol=1e-5)
    excerpt = alpsprune.perplexity(model, tok, "wiki-excerpt", seqlen=128, max_windows=2, progress=False)
    assert excerpt.windows == 2 and excerpt.dataset == "wiki-excerpt" and excerpt.ppl > 1


def test_training_mode_restored(model, tok):
    model.train()
    perplexity(model, tok, torch.arange(300) % len(tok), seqlen=64, progress=False)
    assert model.training
    model.eval()


def _count_block_moves(model) -> list[int]:
    """Count ``.to(...)`` calls on every decoder block (a read-only visit = one move to the device)."""
    from alpsprune.models import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    counts = [0] * len(blocks)
    for i, block in enumerate(blocks):
        original = block.to

        def counting(*args, i=i, original=original, **kwargs):
            counts[i] += 1
            return original(*args, **kwargs)

        block.to = counting
    return counts


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "gpt2"])
def test_offloaded_evaluation_streams_blocks(arch):
    """offload=True runs block by block over all windows: each block visits the device once per
    evaluation (not once per window), the perplexity equals the plain forward's, the weights stay put."""
    from tiny_models import make_tiny_model

    model = make_tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (5 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    plain = alpsprune.perplexity(model, None, ids, seqlen=16, progress=False)
    for batch_size, place in ((1, True), (2, "disk"), (5, "device")):
        counts = _count_block_moves(model)
        off = alpsprune.perplexity(
            model,
            None,
            ids,
            seqlen=16,
            batch_size=batch_size,
            progress=False,
            offload=True,
            offload_activations=place,
            device="cpu",
        )
        assert counts == [1] * len(counts), counts  # one visit for 5 windows (its own tensors put back)
        assert off.windows == plain.windows == 5
        assert off.ppl == pytest.approx(plain.ppl, rel=1e-6)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_resident_evaluation_moves_no_block():
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama")
    ids = torch.arange(3 * 16) % model.config.vocab_size
    counts = _count_block_moves(model)
    auto = alpsprune.perplexity(model, None, ids, seqlen=16, progress=False, offload="auto", device="cpu")
    assert counts == [0] * len(counts)  # on the CPU the model is resident already
    assert auto.ppl == alpsprune.perplexity(model, None, ids, seqlen=16, progress=False).ppl
