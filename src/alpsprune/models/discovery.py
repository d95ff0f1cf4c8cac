"""Finding the decoder blocks and the prunable linears of a Hugging Face causal LM.

Architectures are not special-cased: the block stack is the `nn.ModuleList` whose children are the classes the
model itself declares as unsplittable (`_no_split_modules`), which every transformers decoder lists. A small
fallback heuristic covers models (e.g. remote code) that leave that attribute empty. Weights are always handled
as `(out, in)`; GPT-2's `Conv1D` stores `(in, out)` and is transposed here, at the edge, and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from alpsprune.errors import ModelError, TargetError

try:  # transformers' GPT-2 style linear with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it
    Conv1D = ()  # type: ignore[assignment,misc]

# Class-name endings of causal-LM heads, for models outside transformers' auto mapping (remote code).
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _is_causal_lm(model: nn.Module) -> bool:
    """True for decoder-only language-model heads; encoder-decoder and encoder-only models are refused."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return False
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _split_class_names(model: nn.Module) -> set[str]:
    names = getattr(model, "_no_split_modules", None) or ()
    return {str(n) for n in names}


def _n_linears(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if is_target_module(m))


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the `ModuleList` of decoder blocks (`model.layers`, `transformer.h`, ...).

    Raises ModelError when the model is not a decoder-only causal LM or no block stack can be found.
    """
    if not _is_causal_lm(model):
        raise ModelError(
            f"{type(model).__name__} is not a decoder-only causal language model; alpsprune prunes models "
            "that load with AutoModelForCausalLM (Llama, Qwen, Mistral, Gemma, Phi, OPT, GPT-2, GPT-NeoX, ...)"
        )
    block_classes = _split_class_names(model)
    declared: list[tuple[str, nn.ModuleList]] = []
    fallback: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if block_classes and all(type(c).__name__ in block_classes for c in children):
            declared.append((name, module))
        elif len({type(c) for c in children}) == 1 and _n_linears(children[0]) >= 2:
            fallback.append((name, module))
    candidates = declared or fallback
    if not candidates:
        raise ModelError(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"{sorted(block_classes) or 'repeated blocks with linear layers'}"
        )
    # Nested matches (a stack inside a block) are never the top-level stack; prefer the longest outermost one.
    outer = [c for c in candidates if not any(c[0].startswith(o[0] + ".") for o in candidates if o is not c)]
    return max(outer, key=lambda c: len(c[1]))


def is_target_module(module: nn.Module) -> bool:
    """A module alpsprune can prune: `nn.Linear` or transformers' `Conv1D` (never embeddings or norms)."""
    return isinstance(module, (nn.Linear, Conv1D))


@dataclass(frozen=True)
class Pattern:
    """One `targets`/`ignore` entry. Plain text is a regex searched in the full module name (and also
    matches a module whose class, or a base class, has exactly that name: `Linear`); `re:REGEX` is
    llm-compressor's spelling, matched from the start of the name."""

    text: str
    regex: re.Pattern[str]
    anchored: bool

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.anchored:
            return self.regex.match(name) is not None
        return self.regex.search(name) is not None or any(
            cls.__name__ == self.text for cls in type(module).__mro__
        )


def _compile(patterns: Iterable[str] | None, what: str) -> list[Pattern]:
    compiled = []
    for pattern in patterns or ():
        anchored = pattern.startswith("re:")
        try:
            compiled.append(Pattern(pattern, re.compile(pattern.removeprefix("re:")), anchored))
        except re.error as exc:
            raise TargetError(f"invalid {what} regex {pattern!r}: {exc}") from None
    return compiled


def find_target_linears(
    block: nn.Module, prefix: str, targets: list[str] | None = None, ignore: list[str] | None = None
) -> dict[str, nn.Module]:
    """Full dotted name → module for the prunable linears of one block, in module order.

    A layer is kept if some `targets` entry matches it (default: all) and no `ignore` entry does. Entries
    are regexes searched in the full name, e.g. `mlp\\.` against `model.layers.3.mlp.down_proj`;
    llm-compressor's `re:REGEX` (matched from the start of the name); or class names such as `Linear`.
    """
    include = _compile(targets, "targets")
    exclude = _compile(ignore, "ignore")
    found: dict[str, nn.Module] = {}
    for sub_name, module in block.named_modules():
        if not sub_name or not is_target_module(module):
            continue
        name = f"{prefix}.{sub_name}" if prefix else sub_name
        if include and not any(p.matches(name, module) for p in include):
            continue
        if any(p.matches(name, module) for p in exclude):
            continue
        found[name] = module
    return found


def list_target_layers(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> dict[str, nn.Module]:
    """Every selected linear across all decoder blocks, in block order (may be empty; see `require_targets`)."""
    path, blocks = find_decoder_blocks(model)
    layers: dict[str, nn.Module] = {}
    for index, block in enumerate(blocks):
        layers.update(find_target_linears(block, f"{path}.{index}", targets, ignore))
    return layers


def require_targets(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> dict[str, nn.Module]:
    """Like `list_target_layers`, but a `targets`/`ignore` entry that matches no module of the model, or a
    selection that matches no layer, is a TargetError naming the entry and real module names."""
    available = list(list_target_layers(model))
    sample = ", ".join(available[:4]) + (", ..." if len(available) > 4 else "")
    modules = [(name, m) for name, m in model.named_modules() if name]
    for what, patterns in (("targets", targets), ("ignore", ignore)):
        for pattern in _compile(patterns, what):
            if not any(pattern.matches(name, m) for name, m in modules):
                raise TargetError(
                    f"{what} pattern {pattern.text!r} matches no module of {type(model).__name__}; names look "
                    f"like {sample or '(none)'} (a pattern is a regex searched in these names, 're:REGEX' "
                    "matched from their start, or a class name such as Linear)"
                )
    layers = list_target_layers(model, targets, ignore)
    if layers:
        return layers
    raise TargetError(
        f"targets={targets!r} with ignore={ignore!r} select no layer; {len(available)} linear layers are "
        f"available, e.g. {sample or '(none)'}"
    )


def unprunable_parameters(model: nn.Module) -> dict | None:
    """Weights inside the decoder blocks that alpsprune leaves dense because they are not linear layers:
    fused mixture-of-experts tensors of 3 or more dimensions (Mixtral, Qwen-MoE in transformers 5).
    None if there are none; else a summary for the report and the warning."""
    path, blocks = find_decoder_blocks(model)
    names: list[str] = []
    numel = total = 0
    for index, block in enumerate(blocks):
        for sub_name, param in block.named_parameters():
            total += param.numel()
            if param.dim() >= 3:
                names.append(f"{path}.{index}.{sub_name}")
                numel += param.numel()
    if not names:
        return None
    kinds = sorted({name.split(".", 2 + path.count("."))[-1] for name in names})
    return {
        "parameters": names,
        "kinds": kinds,
        "numel": numel,
        "fraction_of_block_weights": numel / total if total else 0.0,
        "reason": "fused mixture-of-experts weights (3-D parameters, not nn.Linear layers) are not supported "
        "yet and stay dense",
    }


def get_weight(module: nn.Module) -> torch.Tensor:
    """A detached copy of the weight as `(out, in)`, in the module's dtype and device (Conv1D transposed)."""
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        weight = weight.t()  # Conv1D stores (in, out)
    return weight.clone()


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write an `(out, in)` weight in place, cast to the module's own dtype and device."""
    target = module.weight.data
    if isinstance(module, Conv1D):
        target = target.t()  # a view: copying into it writes the (in, out) storage
    if tuple(W.shape) != tuple(target.shape):
        raise ValueError(
            f"weight shape {tuple(W.shape)} does not match the layer's (out, in) {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(W)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """`(out, in)` without copying the weight."""
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)
