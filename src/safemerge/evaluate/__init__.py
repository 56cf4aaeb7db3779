"""Evaluation harness: generation backends, judges, metrics, prompt-set loaders and reports.

Import-light: submodules import torch/transformers only inside the functions that need them.
Main entry point: :func:`safemerge.evaluate.api.evaluate`, also reachable as
``safemerge.evaluate.evaluate`` (the names below are imported on first access).
"""
from __future__ import annotations

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
