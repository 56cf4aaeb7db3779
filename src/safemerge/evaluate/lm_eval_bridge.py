"""lm-evaluation-harness on the model safemerge evaluates: utility benchmarks next to the safety suites.

:func:`run_lm_eval` hands the already-loaded model (adapter applied through PEFT, exactly the
model whose generations the safety suites judged) to lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` on the requested tasks. Task definitions come from lm-eval's own
registry or from ``include`` (a directory of task YAML files, lm-eval's ``--include_path``).
Offline, tasks whose data are local files run: a task YAML with ``dataset_path: json`` and
``dataset_kwargs: {data_files: ...}``. lm-eval is an optional dependency
(``pip install 'safemerge[lm-eval]'``).

The metrics land in ``results.json`` under ``"lm_eval"``::

    {"tasks": {TASK: {"metrics": {"acc": 0.61, ...}, "stderr": {"acc": 0.02, ...}, "n": 500,
                      "version": 1.0, "num_fewshot": 0}},
     "settings": {"tasks": [...], "include": DIR, "limit": N, "seed": 0, "lm_eval_version": "0.4.13"}}
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError

INSTALL_HINT = "install it with: pip install 'safemerge[lm-eval]' (or pip install lm-eval)"


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"arc_easy,my_task"`` → ``["arc_easy", "my_task"]`` (order kept, duplicates dropped)."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return list(dict.fromkeys(t.strip() for t in items if t and t.strip()))


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise SafemergeError("--lm-eval-tasks needs lm-evaluation-harness, which is not installed",
                             INSTALL_HINT) from exc
    return lm_eval


def task_manager(tasks: list[str], include: str | Path | None) -> Any:
    """lm-eval's ``TaskManager``: only ``include``'s tasks when it defines them all (fast, offline),
    else lm-eval's full registry as well. Unknown task names are a one-line error."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include is not None:
        inc = Path(include).expanduser()
        if not inc.is_dir():
            raise SafemergeError(f"--lm-eval-include {str(include)!r} is not a directory",
                                 "pass a directory of lm-eval task YAML files")
        local = TaskManager(verbosity="ERROR", include_path=str(inc), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(verbosity="ERROR", include_path=str(Path(include).expanduser()) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SafemergeError(f"unknown lm-eval task {unknown[0]!r}",
                             "list lm-eval's tasks with: lm-eval ls tasks; for your own, pass --lm-eval-include DIR "
                             "with its YAML")
    return manager


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """lm-eval's warnings off (safemerge passes a loaded model on purpose, which lm-eval warns about);
    its tqdm bars, which no option turns off, are swallowed unless ``progress``."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def _task_entry(name: str, raw: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys → ``{"metrics": {acc}, "stderr": {acc}}``."""
    metrics: dict[str, float | None] = {}
    stderr: dict[str, float | None] = {}
    for key, value in raw[name].items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        label = metric if filt == "none" else f"{metric} ({filt})"
        if metric.endswith("_stderr"):
            stderr[label.replace("_stderr", "", 1)] = _finite(value)
        else:
            metrics[label] = _finite(value)
    n = (out.get("n-samples") or {}).get(name, {})
    return {"metrics": metrics, "stderr": stderr, "n": n.get("effective", n.get("original")),
            "version": (out.get("versions") or {}).get(name), "num_fewshot": (out.get("n-shot") or {}).get(name)}


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, include: str | Path | None = None,
                limit: int | None = None, batch_size: int | None = None, num_fewshot: int | None = None,
                seed: int = 0, progress: bool = True, manager: Any = None) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on an in-memory causal LM (``PreTrainedModel`` or ``PeftModel``).

    Args:
        model, tokenizer: the model as the rest of the evaluation uses it (adapter applied).
        tasks: lm-eval task names.
        include: directory of task YAML files (lm-eval's ``include_path``).
        limit: at most this many documents per task (like ``--limit`` for the safety suites).
        batch_size: lm-eval batch size (default 1 on CPU).
        num_fewshot: few-shot examples (default: each task's own).
        seed: lm-eval's python/numpy/torch/few-shot seeds.
        progress: show lm-eval's progress bars.
        manager: a :func:`task_manager` built earlier (validation before generation), else built here.

    Returns:
        The ``results.json`` ``"lm_eval"`` object described in the module docstring.
    """
    names = parse_tasks(tasks)
    if not names:
        raise SafemergeError("--lm-eval-tasks is empty", "pass task names, e.g. --lm-eval-tasks arc_easy,hellaswag")
    lm_eval = _require_lm_eval()
    manager = manager or task_manager(names, include)
    from lm_eval.models.huggingface import HFLM

    with _quiet(progress):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or 1)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, log_samples=False, verbosity="ERROR")
    if out is None:  # only on non-zero ranks of a distributed run, which safemerge never starts
        raise SafemergeError("lm-eval returned no results", "rerun without a distributed launcher")
    raw = out["results"]
    return {
        "tasks": {name: _task_entry(name, raw, out) for name in raw},
        "settings": {"tasks": names, "include": str(include) if include else None, "limit": limit,
                     "num_fewshot": num_fewshot, "seed": seed, "lm_eval_version": getattr(lm_eval, "__version__",
                                                                                          None)},
    }
