"""MergeAlign ("Combining Domain and Alignment Vectors … Knowledge-Safety Trade-offs in LLMs",
arXiv 2411.06824; ACL 2025 Short): interpolate the domain vector ``τ_D = θ_domain − θ_pre`` and
the alignment vector ``τ_A = θ_aligned − θ_pre`` and add them back to the pre-trained model::

    θ = θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre)       (MergeAlign)

With ``λ_D + λ_A = 1`` this equals ``λ_D θ_domain + λ_A θ_aligned`` (a weight average of two
models that share the pre-trained parent).
"""
from __future__ import annotations

from typing import Any

from safemerge.errors import ConfigError


def check_lambda(value: Any, flag: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, got {value!r}", "e.g. 0.5") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{flag} must be finite, got {value!r}", "e.g. 0.5")
    return v
