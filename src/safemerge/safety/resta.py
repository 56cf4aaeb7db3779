"""RESTA — REstoring Safety through Task Arithmetic (Bhardwaj, Anh & Poria, ACL 2024, arXiv 2402.11746).

The safety vector is ``v = θ_aligned − θ_unaligned`` (§3, where the unaligned twin is made by
fine-tuning the aligned model on harmful data, or is the pre-trained base). A compromised
fine-tuned model is re-aligned by task arithmetic (Ilharco et al. 2023)::

    θ = θ_ft + β · (θ_aligned − θ_unaligned)                          (RESTA, Eq. 1)

optionally after DARE (Yu et al. 2024, Eq. 2) on the fine-tuning delta ``δ = θ_ft − θ_aligned``
(drop each entry with probability 1 − p, rescale the kept ones by 1/p)::

    θ = θ_aligned + DARE_p(δ) + β · (θ_aligned − θ_unaligned)
"""
from __future__ import annotations

from typing import Any

from safemerge.errors import ConfigError


def check_beta(beta: Any) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ConfigError(f"--beta must be a number, got {beta!r}", "e.g. --beta 0.5") from None
    if b != b or b in (float("inf"), float("-inf")):
        raise ConfigError(f"--beta must be finite, got {beta!r}", "e.g. --beta 0.5")
    return b


def check_density(density: Any) -> float | None:
    if density is None:
        return None
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ConfigError(f"--dare-density must be a number, got {density!r}", "use a keep fraction in (0, 1], e.g. 0.9") from None
    if not 0.0 < d <= 1.0:
        raise ConfigError(f"--dare-density = {density!r} is outside (0, 1]", "use a keep fraction in (0, 1], e.g. 0.9")
    return d
