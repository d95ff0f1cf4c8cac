"""Capturing what block 0 receives, and running one block on its own.

The sequential pipeline never runs the whole model: it records the hidden states entering block 0 together with
*every* keyword argument the model passes to its blocks (attention mask, position ids, rotary
`position_embeddings`, cache position, ...), then feeds blocks one by one. Some architectures hand different
blocks different arguments — Gemma 2/3 give sliding-window layers their own mask and rotary tables, Qwen2/3 and
Mistral can mix sliding and full layers — so the arguments are recorded for every block, once per batch shape, by
temporarily replacing each block's `forward` with a recorder that returns its input unchanged. Later batches of a
known shape only need block 0's input, caught by a forward pre-hook that stops the forward at once.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from alpsprune.errors import ModelError
from alpsprune.models.discovery import find_decoder_blocks

Shape = tuple[int, ...]


class _StopForward(Exception):
    """Raised by the recorders once the wanted inputs are in hand; never escapes `capture_block_inputs`."""


@dataclass
class BlockInputs:
    """Inputs of block 0 for all calibration batches, plus the keyword arguments of every block.

    `hidden[j]` is batch `j`, `(b, seqlen, hidden)`. Keyword arguments depend only on the batch shape, not the
    tokens, so they are stored once per shape and per block: call `kwargs_for(block_index, batch_index)`. Blocks
    that share an argument (the same mask tensor) share the object, so per-block storage costs no extra memory.
    When the pipeline replaces `hidden` by the next block's inputs (same shapes), `kwargs_for` keeps working.
    """

    hidden: list[torch.Tensor]
    block_kwargs: dict[Shape, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return len(next(iter(self.block_kwargs.values()))) if self.block_kwargs else 0

    @property
    def kwargs(self) -> dict[str, Any]:
        """Block 0's arguments for the first batch; use `kwargs_for` for other blocks (they may differ)."""
        return self.kwargs_for(0, 0)

    def kwargs_for(self, block_index: int, batch_index: int = 0) -> dict[str, Any]:
        """The keyword arguments block `block_index` receives for batch `batch_index` (a fresh dict)."""
        batch_shape = getattr(self.hidden, "batch_shape", None)  # a stream knows shapes without loading
        shape = tuple((batch_shape(batch_index) if batch_shape else self.hidden[batch_index].shape)[:2])
        try:
            per_block = self.block_kwargs[shape]
        except KeyError:
            raise KeyError(f"no block arguments captured for batch shape {shape}") from None
        return dict(per_block[block_index])

    def to(self, device: torch.device | str) -> BlockInputs:
        """Move hidden states and every tensor argument, keeping shared tensors shared."""
        memo: dict[int, Any] = {}
        hidden = [h.to(device) for h in self.hidden]
        kwargs = {
            s: [_move(kw, device, memo) for kw in per_block] for s, per_block in self.block_kwargs.items()
        }
        return BlockInputs(hidden=hidden, block_kwargs=kwargs)


def _move(value: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """Recursively move tensors inside tuples/lists/dicts; the memo keeps one copy per source tensor."""
    if isinstance(value, torch.Tensor):
        key = id(value)
        if key not in memo:
            memo[key] = (value, value.to(device))  # keep the source alive so its id stays unique
        return memo[key][1]
    if isinstance(value, tuple):
        return tuple(_move(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_move(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device, memo) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured arguments (tensors compared by shape, dtype and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # objects without a usable equality are never considered equal
        return False


def _as_kwargs(
    signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, dict]:
    """Split a block call into (hidden_states, keyword arguments), naming positional extras (GPT-2 passes the
    cache and the mask positionally) so that every block can later be called as `block(hidden, **kwargs)`."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:  # an unusual signature: fall back to the call as made
        if len(args) != 1:
            raise ModelError(
                "decoder blocks are called with positional arguments alpsprune cannot name"
            ) from None
        return args[0], dict(kwargs)
    named: dict[str, Any] = {}
    hidden = None
    for index, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if index == 0 and kind is not inspect.Parameter.VAR_KEYWORD:
            hidden = value
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ModelError("decoder blocks take extra positional arguments alpsprune cannot name")
        else:
            named[name] = value
    if not isinstance(hidden, torch.Tensor):
        raise ModelError("the first argument of a decoder block is not a hidden-states tensor")
    return hidden, named


def _non_block_tensors(model: nn.Module, block_path: str) -> list[tuple[nn.Module, str, bool]]:
    """(owner, name, is_parameter) for every parameter/buffer outside the block stack (embeddings, rotary
    tables, final norm, head); tied weights appear once per owner, which is harmless for moving."""
    found: list[tuple[nn.Module, str, bool]] = []
    skip = block_path + "."
    for name, module in model.named_modules():
        if name == block_path or name.startswith(skip):
            continue
        found += [(module, n, True) for n, p in module._parameters.items() if p is not None]
        found += [(module, n, False) for n, b in module._buffers.items() if b is not None]
    return found


def _move_outside_blocks(model: nn.Module, block_path: str, device: torch.device) -> Callable[[], None]:
    """Move the modules that run before/after the blocks to `device`; return a function that undoes it.

    Parameters and buffers are swapped for device copies and the original objects put back afterwards, so
    restoring is exact and free; a tied weight (embedding = head) gets one shared copy, keeping the tie."""
    undo: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    copies: dict[int, torch.Tensor] = {}
    for owner, name, is_param in _non_block_tensors(model, block_path):
        table = owner._parameters if is_param else owner._buffers
        tensor = table[name]
        if tensor.device == device:
            continue
        if id(tensor) not in copies:
            moved = tensor.detach().to(device)
            copies[id(tensor)] = (
                nn.Parameter(moved, requires_grad=tensor.requires_grad) if is_param else moved
            )
        undo.append((owner, name, is_param, tensor))
        table[name] = copies[id(tensor)]

    def restore() -> None:
        for owner, name, is_param, original in reversed(undo):
            (owner._parameters if is_param else owner._buffers)[name] = original

    return restore


def capture_block_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device | str,
    batch_size: int = 1,
    store_device: torch.device | str | None = None,
    sink: Any = None,
) -> BlockInputs:
    """Hidden states entering block 0 for `input_ids` `(n, seqlen)`, and every block's keyword arguments.

    Only the modules outside the block stack run, on `device`; they are moved there for the call and moved back
    in a `finally`, so the model's weights stay where they were. Hidden states are kept on `store_device`
    (default `device`), arguments on `device`; or appended to `sink` (an
    :class:`alpsprune.streaming.ActivationStream`, which keeps them where it keeps its batches). The cache is
    disabled (`use_cache=False`).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (n, seqlen), got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    device = torch.device(device)
    store = torch.device(store_device) if store_device is not None else device
    path, blocks = find_decoder_blocks(model)
    signature = inspect.signature(blocks[0].forward)
    inputs = BlockInputs(hidden=sink if sink is not None else [])

    restore = _move_outside_blocks(model, path, device)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                shape = tuple(batch.shape)
                if shape in inputs.block_kwargs:
                    hidden, kwargs = _catch_block0(model, blocks, signature, batch)
                    if not all(_same(kwargs.get(k), v) for k, v in inputs.block_kwargs[shape][0].items()):
                        raise ModelError(
                            f"{type(model).__name__} passes token-dependent arguments to its blocks; "
                            "use batch_size equal to the number of samples"
                        )
                else:
                    hidden, per_block = _record_all_blocks(model, blocks, signature, batch)
                    inputs.block_kwargs[shape] = per_block
                inputs.hidden.append(hidden if sink is not None else hidden.to(store))
    finally:
        restore()
    return inputs


def _call_model(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        model(input_ids=batch, use_cache=False)
    except _StopForward:
        return
    raise ModelError(f"{type(model).__name__}'s forward never reached its decoder blocks")


def _catch_block0(
    model: nn.Module, blocks: nn.ModuleList, signature: inspect.Signature, batch: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Catcher: a pre-hook on block 0 records the call and stops the forward before any block runs."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen["hidden"], seen["kwargs"] = _as_kwargs(signature, args, kwargs)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _call_model(model, batch)
    finally:
        handle.remove()
    return seen["hidden"], seen["kwargs"]


def _record_all_blocks(
    model: nn.Module, blocks: nn.ModuleList, signature: inspect.Signature, batch: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Replace each block's forward by a recorder that passes its input through unchanged, so the model's loop
    hands every block its own arguments without computing anything; the last recorder stops the forward."""
    recorded: list[dict[str, Any]] = []
    first_hidden: list[torch.Tensor] = []
    last = len(blocks) - 1

    def make_recorder(index: int) -> Callable[..., torch.Tensor]:
        def recorder(*args: Any, **kwargs: Any) -> torch.Tensor:
            if len(recorded) != index:
                raise ModelError(
                    f"{type(model).__name__} does not call its decoder blocks once each, in order"
                )
            hidden, named = _as_kwargs(signature, args, kwargs)
            if index == 0:
                first_hidden.append(hidden)
            recorded.append(_dedupe(named, recorded))
            if index == last:
                raise _StopForward
            return hidden

        return recorder

    with replaced_forwards({block: make_recorder(index) for index, block in enumerate(blocks)}):
        _call_model(model, batch)
    if len(recorded) != len(blocks):
        raise ModelError(f"{type(model).__name__} ran {len(recorded)} of its {len(blocks)} decoder blocks")
    return first_hidden[0], recorded


def _dedupe(named: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """Reuse an earlier block's object for an equal argument, so per-block storage shares tensors."""
    out = {}
    for key, value in named.items():
        match = next((kw[key] for kw in earlier if key in kw and _same(kw[key], value)), None)
        out[key] = match if match is not None else value
    return out


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """`block(hidden, **kwargs)`, returning the hidden states whether the block returns a tensor or a tuple."""
    out = block(hidden, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):  # a ModelOutput
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"{type(block).__name__} returned {type(out).__name__}, not hidden states")


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` with the first positional input of every module in ``modules`` on each
    forward; the hooks are removed on exit, whatever happens."""
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=name: fn(n, args[0])) for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaced_forwards(forwards: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Give each module in ``forwards`` that function as its ``forward`` (hooks still run); put the
    previous one back on exit, whatever happens — also an instance-level one (e.g. accelerate's)."""
    saved = [(module, module.__dict__.get("forward")) for module in forwards]
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, original in saved:
            if original is None:
                del module.forward
            else:
                module.forward = original
