"""Zero-shot accuracy through lm-evaluation-harness's Python API (optional: ``pip install alpsprune[eval]``).

The paper's tasks are ``piqa``, ``arc_easy``, ``arc_challenge`` and ``lambada_openai``, metric ``acc``.
Built-in tasks download their data from the Hugging Face Hub; tasks defined in local YAML files
(``include_path``) that read local data files work offline. Arguments keep lm-eval's names and meanings
(``num_fewshot``, ``batch_size="auto"``, ``limit``, ``apply_chat_template``, ``log_samples``, ``output_path``).
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


# `datasets` builders that read local files: a task whose YAML sits in an include path and names one of
# these (or an existing folder) never touches the Hub, so no reachability probe is needed.
_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})


def _local_task(manager: Any, name: str, include_paths: list[str]) -> bool:
    """Whether task ``name`` is defined in ``include_paths`` and reads only local data files."""
    from pathlib import Path

    entry = manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None or not include_paths:
        return False
    roots = [Path(p).resolve() for p in include_paths]
    here = Path(yaml_path).resolve()
    if not any(here == r or r in here.parents for r in roots):
        return False
    dataset = cfg.get("dataset_path")
    return isinstance(dataset, str) and (dataset in _LOCAL_BUILDERS or Path(dataset).expanduser().exists())


def _task_manager(TaskManager: Any, task_list: list[str], paths: list[str], include_defaults: bool) -> Any:
    """lm-eval's TaskManager; when every task is a plain task (not a group or tag) defined in the
    include paths, lm-eval's ~thousands of built-in YAMLs are not indexed (measured: 46 s on a loaded
    2-core machine) — the include paths win over built-ins of the same name either way."""
    if paths and include_defaults:
        local = TaskManager(include_path=paths, include_defaults=False)
        kinds = [getattr(getattr(local.task_index.get(t), "kind", None), "name", None) for t in task_list]
        if all(kind in ("TASK", "PY_TASK") for kind in kinds):
            return local
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_fewshot: int | None = 0,
    *,
    seed: int = 0,
    max_length: int | None = None,
    include_defaults: bool = True,
    max_batch_size: int | None = None,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool | None = None,
    log_samples: bool = False,
    output_path: str | os.PathLike | None = None,
    model_name: str | None = None,
) -> dict[str, dict[str, float | None]]:
    """Metrics per task: ``{task: {"acc": .., "acc_stderr": .., ...}}``, through lm-eval's
    ``simple_evaluate`` with its own argument meanings.

    ``tasks`` defaults to :data:`PAPER_TASKS`; ``limit`` caps the documents per task (a count, or a
    fraction below 1); ``batch_size`` is an int or lm-eval's ``"auto"`` / ``"auto:N"`` (with
    ``max_batch_size``); ``num_fewshot`` ``None`` keeps each task's own setting; ``apply_chat_template``
    (True or a template name) and ``fewshot_as_multiturn`` (default: on with a chat template, as in
    lm-eval's CLI) format prompts as chats. ``output_path`` (a folder or a ``.json`` file) receives
    lm-eval's full results file exactly as ``lm_eval --output_path`` writes it, plus the per-sample
    files with ``log_samples``; ``model_name`` names the results subfolder. ``include_path`` adds
    folders (or files) of task YAMLs — lm-eval runs the Python their ``!function`` tags name, so
    include trusted folders only. ``include_defaults=False`` skips indexing lm-eval's built-in tasks.
    The Hub is probed (to fall back to cached data offline) only when a task is not purely local.
    The model is evaluated in place on its current device(s).
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    task_list = list(tasks) if tasks else list(PAPER_TASKS)
    paths: list[str] = []
    if include_path is not None:
        items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        paths = [os.fspath(p) for p in items]
    if fewshot_as_multiturn is None:  # lm-eval's CLI rule
        fewshot_as_multiturn = bool(apply_chat_template)
    if fewshot_as_multiturn and not apply_chat_template:
        raise AlpsPruneError("fewshot_as_multiturn=True needs apply_chat_template (lm-eval's rule)")
    lm_kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_batch_size is not None:
        lm_kwargs["max_batch_size"] = max_batch_size
    if max_length is not None:
        lm_kwargs["max_length"] = max_length
    lm = HFLM(**lm_kwargs)
    manager = _task_manager(TaskManager, task_list, paths, include_defaults)
    tracker = None
    if output_path is not None:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=os.fspath(output_path))
    label = (
        model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    )
    was_training = model.training
    model.eval()
    local = all(_local_task(manager, t, paths) for t in task_list)
    # cache-only instead of minutes of retries when the Hub is unreachable; purely local tasks skip the probe
    offline = not local and not hub_reachable()
    try:
        with offline_mode() if offline else contextlib.nullcontext():
            results = lm_eval.simple_evaluate(
                model=lm,
                model_args={"pretrained": label},  # ignored for a built model; names the results folder
                tasks=task_list,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                max_batch_size=max_batch_size,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                evaluation_tracker=tracker,
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn,
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
    if tracker is not None:  # what `lm_eval --output_path ... [--log_samples]` writes, the same way
        samples = results.pop("samples", None) if log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    table = results.get("results", {})
    return {name: _metrics(table[name]) for name in task_list if name in table}
