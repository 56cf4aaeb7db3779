"""``--tau`` / ``--alpha`` of ``safemerge safemerge``: a number, or ``auto`` (tuned on validation sets).

A CLI module: the tuning workflow (torch) is imported only when ``auto`` asks for it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from safemerge.cache import cache_root
from safemerge.errors import SafemergeError
from safemerge.tuning.grid import SearchSettings

if TYPE_CHECKING:
    from safemerge.evaluate.records import PromptSets
    from safemerge.evaluate.suites import SuiteSettings
    from safemerge.safety.settings import SafeMergeModels
    from safemerge.tuning.result import AutotuneResult


def parse_tau_alpha(tau: str | float, alpha: str | float) -> tuple[float | None, float | None]:
    """``"auto"`` → ``None`` (to be tuned), a number → itself; anything else is a user error."""
    out: list[float | None] = []
    for name, v in (("--tau", tau), ("--alpha", alpha)):
        if isinstance(v, str) and v.strip().lower() == "auto":
            out.append(None)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError) as exc:
            raise SafemergeError(f"{name} must be a number or 'auto', got {v!r}",
                                 f"pass e.g. {name} 0.35 or {name} auto") from exc
    return out[0], out[1]


def autotune_work_dir(models: SafeMergeModels, validation: PromptSets, judge: str) -> Path:
    """``<cache>/autotune/<hash of the inputs>``: a rerun with the same models and sets reuses every generation."""
    paths = [str(Path(p).absolute()) for p in (models.base, models.aligned, models.finetuned, models.safety)]
    sets = [str(validation.harmful), str(validation.utility), str(validation.benign), judge]
    return cache_root() / "autotune" / hashlib.sha256(json.dumps(paths + sets).encode()).hexdigest()[:12]


def resolve_tau_alpha(
    tau: str | float,
    alpha: str | float,
    models: SafeMergeModels,
    validation: PromptSets,
    *,
    search: SearchSettings = SearchSettings(),
    settings: SuiteSettings | None = None,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[float, float, AutotuneResult | None]:
    """Numbers pass through; ``auto`` for τ and/or α runs :func:`safemerge.tuning.search.autotune` (the other
    one fixed), in ``work_dir`` (default :func:`autotune_work_dir`, so reruns are cached). The late-block extension
    is searched only when τ is ``auto``; the chosen point's gain and ``min_layer`` are in the result.

    Used by ``safemerge safemerge --tau auto --alpha auto --val-harmful SET --val-utility SET [--val-benign SET]``.
    """
    from safemerge.evaluate.suites import SuiteSettings
    from safemerge.tuning.search import autotune

    t, a = parse_tau_alpha(tau, alpha)
    if t is not None and a is not None:
        return t, a, None
    if validation.harmful is None or validation.utility is None:
        raise SafemergeError("--tau auto / --alpha auto need validation prompts",
                             "pass --val-harmful SET and --val-utility SET (keep them disjoint from your test sets)")
    settings = settings or SuiteSettings()
    grid = replace(search, taus=search.taus if t is None else (t,), alphas=search.alphas if a is None else (a,),
                   extensions=search.extensions and t is None)  # the late-block extension replaces τ
    res = autotune(models, validation, work_dir or autotune_work_dir(models, validation, settings.judge),
                   search=grid, settings=settings, log=log)
    return res.tau, res.alpha, res
