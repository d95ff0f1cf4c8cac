"""Evaluation: perplexity with the standard recipe and zero-shot accuracy via lm-evaluation-harness."""

from __future__ import annotations

from .lmeval import PAPER_TASKS, MissingExtraError, zero_shot
from .perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["PAPER_TASKS", "MissingExtraError", "PerplexityResult", "perplexity", "window_nll", "zero_shot"]
