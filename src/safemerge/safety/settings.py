"""What one SafeMERGE merge reads and how it merges: two small frozen records, built once by the command line.

* :class:`SafeMergeModels` — the four inputs of SafeMERGE (Djuhera et al. 2025, §3): the unaligned ``base`` and
  the ``aligned`` model (their difference spans the safety subspace), the task update ``finetuned`` and the
  ``safety`` update (LoRA adapters trained on ``aligned``, or full fine-tunes of it).
* :class:`SafeMergeSettings` — the rule and the weights: merge layer i iff ``ρ_i < τ`` (and, with the late-block
  extension, its block is ``≥ min_layer``), as ``α ΔW_f + g(1−α) ΔW_s`` (``g = safety_gain``; 1 in the paper) by
  ``strategy`` (``density`` for the DARE/TIES strategies; ``compat="reference"``: PEFT 0.14's factor-wise mixing).
  Every value is checked when the object is built, against the declarations of
  :mod:`safemerge.methods.safety_params` (the error names the command-line flag).

Torch-free (as ``safety_params``), so the torch-free workflow modules (``tuning/grid.py``) can build them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safemerge.methods.safety_params import (
    SAFEMERGE_ALPHA,
    SAFEMERGE_DENSITY,
    SAFEMERGE_MIN_LAYER,
    SAFEMERGE_SAFETY_GAIN,
    SAFEMERGE_TAU,
    check_strategy,
)


@dataclass(frozen=True)
class SafeMergeModels:
    """SafeMERGE's four inputs: the unaligned ``base`` and ``aligned`` models (the safety subspace), and the task
    (``finetuned``) and ``safety`` updates trained on ``aligned`` (LoRA adapters or full fine-tuned models)."""

    base: str | Path
    aligned: str | Path
    finetuned: str | Path
    safety: str | Path


@dataclass(frozen=True)
class SafeMergeSettings:
    """Where SafeMERGE merges (``tau``, ``min_layer``) and with which weights (``alpha``, ``safety_gain``,
    ``strategy``, ``density``, ``compat``); defaults: the reference code's τ = 0.35, α = 0.8, the paper's rule.

    ``density`` is used (and checked) only by the ``dare_linear``/``ties``/``dare_ties`` strategies.
    """

    tau: float = SAFEMERGE_TAU.default
    alpha: float = SAFEMERGE_ALPHA.default
    strategy: str = "linear"
    compat: str | None = None
    density: float = SAFEMERGE_DENSITY.default
    safety_gain: float = SAFEMERGE_SAFETY_GAIN.default
    min_layer: int = SAFEMERGE_MIN_LAYER.default

    def __post_init__(self) -> None:
        checked = {"tau": SAFEMERGE_TAU.check(self.tau, "--tau"),
                   "alpha": SAFEMERGE_ALPHA.check(self.alpha, "--alpha"),
                   "safety_gain": SAFEMERGE_SAFETY_GAIN.check(self.safety_gain, "--safety-gain"),
                   "min_layer": SAFEMERGE_MIN_LAYER.check(self.min_layer, "--min-layer")}
        check_strategy(self.strategy, self.compat)
        if self.strategy != "linear":
            checked["density"] = SAFEMERGE_DENSITY.check(self.density, "--density")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # the checked (normalised) value, as Param.check returns it
