"""Evaluation harness: generation backends, judges, metrics, prompt-set loaders and reports.

Import-light: submodules import torch/transformers only inside the functions that need them.
Main entry point: :func:`safemerge.evaluate.api.evaluate`. The package itself is callable and
forwards to it, so ``safemerge.evaluate(...)`` works whether or not this subpackage has already
been imported (importing it makes ``safemerge.evaluate`` refer to the package).
"""
from __future__ import annotations

import sys
import types

from safemerge._lazy import lazy_getattr

_LAZY = {
    "evaluate": "safemerge.evaluate.api",
    "load_prompts": "safemerge.evaluate.datasets",
    "PromptRecord": "safemerge.evaluate.datasets",
    "load_generator": "safemerge.evaluate.generate",
    "get_judge": "safemerge.evaluate.judges",
    "Verdict": "safemerge.evaluate.judges",
    "results_markdown": "safemerge.evaluate.report",
    "compare_runs": "safemerge.evaluate.report",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from safemerge.evaluate.api import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
