"""Shared fixtures: tiny random models of every supported architecture (see `tiny_models.py`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import ARCHS, make_tiny_model, tiny_input_ids  # noqa: E402

# Tiny models are dominated by per-op overhead; intra-op threads only add contention on small shared machines
# (measured: a tiny GPT-2 forward 0.25 s with 2 threads under load vs 2.5 ms with 1).
# $ALPSPRUNE_TEST_THREADS overrides it (scripts/test_variants.sh runs the suite with 1 and 2 threads).
torch.set_num_threads(int(os.environ.get("ALPSPRUNE_TEST_THREADS", "1")))


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    """Each supported architecture name in turn."""
    return request.param


@pytest.fixture
def tiny_model(arch: str) -> torch.nn.Module:
    """A fresh tiny float32 eval-mode model of `arch` (parametrised over all architectures)."""
    return make_tiny_model(arch)


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    """A fresh tiny Llama, for tests that need one architecture only."""
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """The bundled SmolLM2 tokenizer, through the library's own loader (GGUF, cached after first use)."""
    from alpsprune.io import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture
def input_ids() -> torch.Tensor:
    """Four random 16-token windows from the tiny vocabulary."""
    return tiny_input_ids(4, 16)


@pytest.fixture
def alpsprune_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $ALPSPRUNE_CACHE at a per-session folder so tests never touch the user's cache."""
    path = tmp_path_factory.getbasetemp() / "alpsprune-cache"
    monkeypatch.setenv("ALPSPRUNE_CACHE", str(path))
    return path
