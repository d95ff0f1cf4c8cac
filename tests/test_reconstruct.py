"""Local reconstruction (issue 18): per block, the kept weights are trained towards the dense block's
outputs; the masks never change and a block never ends worse than the solvers left it."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHS, make_tiny_model, tiny_input_ids

import alpsprune
from alpsprune.errors import AlpsPruneError
from alpsprune.models import find_decoder_blocks, list_target_layers
from alpsprune.reconstruct import Reconstruction, output_error, reconstruct_block
from alpsprune.streaming import ActivationStream, Placement

CPU = torch.device("cpu")


def _pruned_mlp_block(hidden: int = 16) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """A small nonlinear 'block' (residual MLP) and a 60%-magnitude-pruned copy with its masks."""
    torch.manual_seed(1)
    dense = torch.nn.Sequential(
        torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(), torch.nn.Linear(4 * hidden, hidden)
    )
    pruned = copy.deepcopy(dense)
    masks = {}
    for layer in (pruned[0], pruned[2]):
        w = layer.weight.data
        keep = w.abs() > w.abs().flatten().kthvalue(int(0.6 * w.numel())).values
        w.mul_(keep)
        masks[layer.weight] = keep
    return dense, pruned, masks


def _streams(dense: torch.nn.Module, xs: list[torch.Tensor]) -> tuple[ActivationStream, ActivationStream]:
    """Inputs (copies of ``xs``) and the dense block's outputs on them, on the CPU."""
    placement = Placement.make(CPU, False, None)
    with torch.no_grad():
        return ActivationStream([x.clone() for x in xs], placement), ActivationStream(
            [dense(x) for x in xs], placement
        )


def test_masks_hold_and_block_error_drops():
    dense, pruned, masks = _pruned_mlp_block()
    torch.manual_seed(0)
    xs = [torch.randn(2, 8, 16) for _ in range(4)]
    inputs, targets = _streams(dense, xs)
    zeros = {id(p): (p == 0).clone() for p in masks}
    stats = reconstruct_block(
        pruned, masks, inputs, targets, lambda b: {}, Reconstruction(epochs=20, lr=1e-2, loss="mse")
    )
    assert stats["kept"] and stats["mse_after"] < 0.5 * stats["mse_before"]
    for p in masks:  # every pruned weight is still exactly zero
        assert bool((p[zeros[id(p)]] == 0).all())
    # independent check of the reported error: recompute it directly
    with torch.no_grad():
        direct = sum(float((pruned(x).double() - dense(x).double()).pow(2).sum()) for x in xs) / sum(
            dense(x).numel() for x in xs
        )
    assert stats["mse_after"] == pytest.approx(direct, rel=1e-9)


def test_a_worse_block_is_undone_bit_for_bit():
    """A step size that diverges must not leave the block worse (or NaN): the solvers' weights come back."""
    dense, pruned, masks = _pruned_mlp_block()
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    placement = Placement.make(CPU, False, None)
    xs = [torch.randn(2, 8, 16) for _ in range(3)]
    with torch.no_grad():
        inputs = ActivationStream(xs, placement)
        targets = ActivationStream([dense(x) for x in xs], placement)
    stats = reconstruct_block(pruned, masks, inputs, targets, lambda b: {}, Reconstruction(epochs=2, lr=1e6))
    assert not stats["kept"]
    for n, p in pruned.named_parameters():
        assert torch.equal(p, before[n]), n


def test_bfloat16_block_trains_in_float32_and_keeps_its_dtype():
    dense, pruned, masks = _pruned_mlp_block()
    pruned = pruned.to(torch.bfloat16)
    masks = {layer.weight: layer.weight != 0 for layer in (pruned[0], pruned[2])}
    placement = Placement.make(CPU, False, None)
    xs = [torch.randn(2, 8, 16) for _ in range(4)]
    with torch.no_grad():
        inputs = ActivationStream([x.bfloat16() for x in xs], placement)
        targets = ActivationStream([dense(x).bfloat16() for x in xs], placement)
    zeros = {id(p): (p == 0).clone() for p in masks}
    stats = reconstruct_block(
        pruned, masks, inputs, targets, lambda b: {}, Reconstruction(epochs=20, lr=1e-2)
    )
    assert stats["kept"] and stats["mse_after"] < stats["mse_before"]
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())
    for p in masks:
        assert bool((p[zeros[id(p)]] == 0).all())


def _calibration(model, n: int = 8) -> torch.Tensor:
    return tiny_input_ids(n, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_reconstruction_keeps_exact_sparsity_and_helps(arch):
    """On every architecture: same masks' sparsity as the solvers give, and the model's output on the
    calibration windows closer to the dense model's than without reconstruction."""
    dense = make_tiny_model(arch)
    calib = _calibration(dense)
    plain, rebuilt = copy.deepcopy(dense), copy.deepcopy(dense)
    options = {"method": "sparsegpt", "sparsity": 0.6, "dense_target": True, "progress": False}
    alpsprune.prune_model(plain, calib, **options)
    report = alpsprune.prune_model(
        rebuilt, calib, **options, reconstruction=Reconstruction(epochs=4, lr=1e-3)
    )
    modules = dict(rebuilt.named_modules())
    assert len(report.layers) == len(list(list_target_layers(rebuilt)))
    for record in report.layers:  # the zeros are exactly the solver's (nothing pruned or revived)
        w = modules[record.name].weight
        assert float((w == 0).double().mean()) == pytest.approx(record.sparsity, abs=1e-12), record.name
        assert record.sparsity >= 0.6 - 1 / w.shape[1], record.name
    blocks = [b["reconstruction"] for b in report.blocks]
    assert len(blocks) == len(find_decoder_blocks(rebuilt)[1])
    assert all(b["mse_after"] <= b["mse_before"] for b in blocks)
    with torch.no_grad():
        ref = dense(calib).logits
        err_plain = float((plain(calib).logits - ref).pow(2).mean())
        err_rebuilt = float((rebuilt(calib).logits - ref).pow(2).mean())
    assert err_rebuilt < err_plain


def test_reconstruction_is_reproducible_and_not_the_papers_algorithm():
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    calib = _calibration(a)
    options = {"method": "alps", "sparsity": 0.7, "dense_target": True, "progress": False}
    rec = Reconstruction(epochs=2, lr=1e-3, seed=3)
    alpsprune.prune_model(a, calib, **options, reconstruction=rec)
    alpsprune.prune_model(b, calib, **options, reconstruction=rec)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name
    with pytest.raises(AlpsPruneError, match="faithful"):
        alpsprune.prune_model(
            make_tiny_model("llama"), calib, method="alps", sparsity=0.5, faithful=True, reconstruction=rec
        )


@pytest.mark.parametrize("epochs, lr", [(0, 1e-4), (1, 0.0), (1, float("nan"))])
def test_bad_settings_are_refused(epochs, lr):
    with pytest.raises(ValueError, match="reconstruction"):
        Reconstruction(epochs=epochs, lr=lr)
    with pytest.raises(ValueError, match="loss must be one of mse, token"):
        Reconstruction(loss="l1")


def test_token_loss_is_the_error_relative_to_each_tokens_dense_rms():
    """Against a loop over tokens: token t's error divided by the RMS of its dense output, so a token
    with a 'massive activation' 100× the others' weighs as much as any other token, not 10⁴× more."""
    torch.manual_seed(0)
    target = torch.randn(2, 5, 8, dtype=torch.float64)
    target[0, 0] *= 100.0  # a massive-activation token
    out = target + 0.1 * torch.randn_like(target)
    expected = torch.empty_like(target)
    for i in range(2):
        for t in range(5):
            rms = (sum(float(v) ** 2 for v in target[i, t]) / 8) ** 0.5
            expected[i, t] = (out[i, t] - target[i, t]) / rms
    assert torch.allclose(output_error(out, target, "token"), expected, rtol=1e-12, atol=0)
    assert torch.equal(output_error(out, target, "mse"), out - target)
    plain = (out - target).pow(2).mean(dim=-1)
    relative = output_error(out, target, "token").pow(2).mean(dim=-1)
    # the noise is the same size on every token: in plain MSE the massive token has its 1/10 share,
    # relative to its own RMS its error is ~100× smaller
    assert float(plain[0, 0] / plain.sum()) == pytest.approx(0.1, abs=0.08)
    assert float(relative[0, 0] / relative.sum()) < 1e-3


def test_token_loss_trains_keeping_masks_and_reports_its_own_loss():
    dense, pruned, masks = _pruned_mlp_block()
    torch.manual_seed(0)
    xs = [torch.randn(2, 8, 16) for _ in range(4)]
    xs[0][0, 0] *= 50.0  # one token far larger than the rest
    inputs, targets = _streams(dense, xs)
    zeros = {id(p): (p == 0).clone() for p in masks}
    stats = reconstruct_block(
        pruned, masks, inputs, targets, lambda b: {}, Reconstruction(epochs=20, lr=1e-2, loss="token")
    )
    assert stats["kept"] and stats["mse_after"] < 0.5 * stats["mse_before"]
    for p in masks:
        assert bool((p[zeros[id(p)]] == 0).all())
    with torch.no_grad():  # the reported numbers are the token-relative loss, recomputed here
        errors = [output_error(pruned(x).double(), dense(x).double(), "token") for x in xs]
        direct = sum(float(e.pow(2).sum()) for e in errors) / sum(e.numel() for e in errors)
    assert stats["mse_after"] == pytest.approx(direct, rel=1e-9)


def test_resume_restores_every_parameter_reconstruction_moved(tmp_path, monkeypatch):
    """Reconstruction also moves norms and biases: a resumed run must get them back from the checkpoint
    and end bit-identical to the uninterrupted run (same code path, same machine)."""
    from alpsprune import pipeline

    calib = _calibration(make_tiny_model("qwen2"))  # qwen2: q/k/v biases move too
    options = {
        "method": "sparsegpt",
        "sparsity": 0.6,
        "progress": False,
        "sequential": "block",  # the paper's layer fits, plus reconstruction
        "dense_target": False,
        "reconstruction": Reconstruction(epochs=2, lr=1e-3),
    }
    whole = make_tiny_model("qwen2")
    alpsprune.prune_model(whole, calib, **options)

    original = pipeline._prune_block

    def stop_at_block_one(index, *args, **kwargs):
        if index == 1:
            raise KeyboardInterrupt
        return original(index, *args, **kwargs)

    resumed = make_tiny_model("qwen2")
    monkeypatch.setattr(pipeline, "_prune_block", stop_at_block_one)
    with pytest.raises(KeyboardInterrupt):
        alpsprune.prune_model(resumed, calib, **options, checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(pipeline, "_prune_block", original)
    fresh = make_tiny_model("qwen2")  # a new process: the interrupted model's memory is gone
    report = alpsprune.prune_model(fresh, calib, **options, checkpoint_dir=tmp_path / "ck", resume=True)
    assert report.blocks[0]["index"] == 0 and len(report.blocks) == 3
    moved = 0
    for (name, a), b, dense in zip(
        whole.named_parameters(), fresh.parameters(), make_tiny_model("qwen2").parameters()
    ):
        assert torch.equal(a, b), name
        moved += int(not torch.equal(a, dense) and "norm" in name)
    assert moved > 0  # the check covered parameters outside the target linears


def test_recipe_settings_per_pattern_and_overrides():
    """ALPS reconstructs by default: 4 epochs above 60% (after dense target + OWL), 2 after the paper's
    layer fits at 60% and below and at N:M; a Reconstruction's unset fields are the recipe's."""
    from alpsprune.pipeline import resolve_recipe, resolve_reconstruction
    from alpsprune.reconstruct import DEFAULTS
    from alpsprune.sparsity import SparsitySpec

    high, low, nm = SparsitySpec.parse(0.7), SparsitySpec.parse(0.6), SparsitySpec.parse(mask_structure="2:4")
    assert resolve_reconstruction("alps", high) == Reconstruction(epochs=4, lr=3e-3, loss="token", seed=0)
    for spec in (low, nm):
        assert resolve_reconstruction("alps", spec) == Reconstruction(epochs=2, lr=3e-3, loss="token")
        assert resolve_recipe("alps", spec)[:2] == ("block", False)  # the paper's layer fits
    assert resolve_recipe("alps", high)[:3] == ("sublayer", True, "owl")
    # only the unset fields come from the recipe; True is the recipe's settings
    assert resolve_reconstruction("alps", low, Reconstruction(lr=1e-3, seed=5)) == Reconstruction(
        epochs=2, lr=1e-3, loss="token", seed=5
    )
    assert resolve_reconstruction("alps", high, True).epochs == 4
    assert resolve_reconstruction("alps", high, False) is None
    assert resolve_reconstruction("alps", high, faithful=True) is None
    # methods without it in their recipe: off unless asked, then the global defaults
    assert resolve_reconstruction("sparsegpt", high) is None
    assert resolve_reconstruction("sparsegpt", high, True) == Reconstruction(**DEFAULTS)
    assert resolve_reconstruction("wanda", low, Reconstruction(loss="mse")).loss == "mse"
