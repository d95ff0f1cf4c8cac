"""Zero-shot accuracy through lm-evaluation-harness's Python API (optional: ``pip install alpsprune[eval]``).

The paper's tasks are ``piqa``, ``arc_easy``, ``arc_challenge`` and ``lambada_openai``, metric ``acc``.
Built-in tasks download their data from the Hugging Face Hub; tasks defined in local YAML files
(``include_path``) that read local data files work offline.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from ..data.sources import hub_reachable, offline_mode
from ..errors import AlpsPruneError, DataError

PAPER_TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "lambada_openai")
INSTALL_HINT = "pip install 'alpsprune[eval]'  (or: pip install 'lm-eval>=0.4.5')"


class MissingExtraError(AlpsPruneError, ImportError):
    """An optional dependency (here lm-evaluation-harness) is not installed."""


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise MissingExtraError(
            f"zero-shot evaluation needs lm-evaluation-harness, which is not installed ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from exc
    return lm_eval, HFLM, TaskManager


def _metrics(task_result: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc": .., "acc_stderr": .., ...}`` from lm-eval's ``"acc,none"``-style keys."""
    out: dict[str, float | None] = {}
    for key, value in task_result.items():
        metric, _, filt = key.partition(",")
        if metric in ("alias", "sample_len") or (filt and filt != "none" and metric in out):
            continue
        if isinstance(value, (int, float)) or value is None:
            out[metric] = None if value is None or value == "N/A" else float(value)
    return out


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_fewshot: int = 0,
    *,
    seed: int = 0,
    max_length: int | None = None,
    include_defaults: bool = True,
) -> dict[str, dict[str, float | None]]:
    """Zero-shot metrics per task: ``{task: {"acc": .., "acc_stderr": .., ...}}``.

    ``tasks`` defaults to :data:`PAPER_TASKS`; ``limit`` caps the documents per task (an int, or a
    fraction); ``include_path`` adds folders (or files) of task YAMLs, so local tasks run offline.
    ``include_defaults=False`` skips indexing lm-eval's built-in tasks (faster; local tasks only).
    The model is evaluated in place on its current device.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    task_list = list(tasks) if tasks else list(PAPER_TASKS)
    paths: list[str] | None = None
    if include_path is not None:
        items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        paths = [os.fspath(p) for p in items]
    lm_kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        lm_kwargs["max_length"] = max_length
    lm = HFLM(**lm_kwargs)
    manager = TaskManager(include_path=paths, include_defaults=include_defaults)
    was_training = model.training
    model.eval()
    offline = not hub_reachable()  # cache-only instead of minutes of retries when the Hub is unreachable
    try:
        with offline_mode() if offline else contextlib.nullcontext():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_list,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except ConnectionError as exc:
        raise DataError(
            f"lm-eval could not download the data of {task_list} ({exc}); the Hugging Face Hub is not "
            "reachable and the data is not cached — run where the Hub is reachable once, or use local task "
            "YAMLs with local data files via include_path"
        ) from exc
    except (KeyError, ValueError) as exc:
        if any(t in str(exc) for t in task_list):
            raise AlpsPruneError(f"lm-eval could not load task(s) {task_list}: {exc}") from exc
        raise
    finally:
        model.train(was_training)
    if results is None:  # non-zero rank in a distributed run
        return {}
    table = results.get("results", {})
    return {name: _metrics(table[name]) for name in task_list if name in table}
