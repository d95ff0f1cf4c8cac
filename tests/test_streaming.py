"""The block-streaming engine (streaming.py): where batches live, in-place passes, device visits."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from alpsprune.errors import AlpsPruneError
from alpsprune.models import find_decoder_blocks, run_block
from alpsprune.streaming import (
    ActivationStream,
    Placement,
    activation_bytes,
    capture_stream,
    propagate,
    resolve_place,
    visiting,
)


@pytest.mark.parametrize("place", ["device", "host", "disk"])
def test_stream_keeps_batches_exactly_and_releases_replaced_ones(place, tmp_path):
    placement = Placement.make("cpu", place, tmp_path)
    batches = [torch.randn(2, 5, 8, dtype=torch.bfloat16) for _ in range(3)]
    stream = ActivationStream(batches, placement)
    assert len(stream) == 3 and stream.element_size == 2
    assert stream.nbytes == 3 * 2 * 5 * 8 * 2
    assert all(torch.equal(stream[i], b) for i, b in enumerate(batches))
    assert stream.batch_shape(1) == (2, 5, 8)
    shared = stream.share()
    stream.put(0, batches[0] * 2)
    assert torch.equal(stream[0], batches[0] * 2) and torch.equal(
        shared[0], batches[0]
    )  # the share keeps its own
    if place == "disk":
        files = list(tmp_path.rglob("*.safetensors"))
        assert len(files) == 4  # 3 shared batches + the replaced one
        del stream, shared
        assert not list(tmp_path.rglob("*.safetensors"))


def test_place_names():
    assert [resolve_place(x) for x in (False, True, "device", "host", "disk")] == [
        "device",
        "host",
        "device",
        "host",
        "disk",
    ]
    with pytest.raises(AlpsPruneError, match="offload_activations"):
        resolve_place("gpu")


def test_capture_and_in_place_propagation_match_the_model(tiny_llama, input_ids):
    """Streaming every block in place gives the model's own last hidden states, and each block is
    moved exactly twice (one visit) for the whole pass over all batches."""
    path, blocks = find_decoder_blocks(tiny_llama)
    inputs = capture_stream(tiny_llama, input_ids, Placement.make("cpu", True), batch_size=1)
    stream = inputs.hidden
    assert isinstance(stream, ActivationStream) and len(stream) == input_ids.shape[0]
    with torch.no_grad():  # the model's own run: hidden_states[i] is block i's input
        states = tiny_llama(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    moves = []
    for index, block in enumerate(blocks):
        assert torch.allclose(torch.cat(list(stream)), states[index], atol=1e-5)
        original = block.to
        block.to = lambda *a, original=original, **k: (moves.append(1), original(*a, **k))[1]
        with visiting(block, torch.device("cpu")):
            propagate(block, stream, lambda b, i=index: inputs.kwargs_for(i, b))
    assert len(moves) == 2 * len(blocks)
    with torch.no_grad():  # the same per-batch calls made directly: bit for bit
        h = states[0]
        for index, block in enumerate(blocks):
            h = torch.cat(
                [run_block(block, h[b : b + 1], inputs.kwargs_for(index, b)) for b in range(len(h))]
            )
    assert torch.equal(torch.cat(list(stream)), h)


def test_activation_bytes_formula_matches_a_captured_stream(tiny_llama, input_ids):
    n, seqlen = input_ids.shape
    hidden = tiny_llama.config.hidden_size
    inputs = capture_stream(tiny_llama, input_ids, Placement.make("cpu", False), batch_size=2)
    got = activation_bytes(n, seqlen, hidden, 4, batch_size=2)
    batch = 2 * seqlen * hidden * 4
    assert got["capture"] - batch == inputs.hidden.nbytes
    dense = activation_bytes(n, seqlen, hidden, 4, batch_size=2, dense_target=True, block_target_bytes=7)
    assert dense["prune"] == 2 * got["prune"] + 7
    assert activation_bytes(n, seqlen, hidden, 4, replay_memory=100)["prune"] == got[
        "prune"
    ] - batch + 100 + (seqlen * hidden * 4)


def test_dense_stream_pruning_needs_no_more_than_two_streams(monkeypatch):
    """With the dense target and no replay budget, the engine never holds more than the pruned and the
    dense stream (plus the batch in flight): no per-layer input store, no replay cache."""
    import alpsprune
    import alpsprune.pipeline as pipeline

    model = make_tiny_model("llama")
    calib = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    stream_bytes = 6 * 16 * model.config.hidden_size * 4
    peak = [0]
    streams: list[ActivationStream] = []
    original_put = ActivationStream.put

    def put(self, index, tensor):
        original_put(self, index, tensor)
        if self not in streams:
            streams.append(self)
        peak[0] = max(peak[0], sum(s.nbytes for s in streams))

    stored = []
    monkeypatch.setattr(ActivationStream, "put", put)
    monkeypatch.setattr(pipeline, "store_dense_inputs", lambda *a, **k: stored.append(1))
    alpsprune.prune_model(
        model,
        calib,
        method="sparsegpt",
        sparsity=0.5,
        dense_target=True,
        allocation="uniform",
        progress=False,
    )
    assert not stored  # the default budget (0) recomputes dense layer inputs instead of storing them
    assert stream_bytes <= peak[0] <= 2 * stream_bytes
