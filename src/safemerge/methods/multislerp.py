"""Multi-SLERP: barycentric spherical interpolation of N models (optionally of task vectors)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.errors import SafemergeError
from safemerge.methods._tensor import check_inputs, f32, nonzero_weight_sum, per_model_list


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (Goddard 2025, "Multi-SLERP"; Buss &
    Fillmore 2001, "Spherical averages and applications to spherical splines", Sec. 2, one step).

    With ``vᵢ = θᵢ − θ_base`` (or ``θᵢ`` without a base), ``uᵢ = vᵢ / (‖vᵢ‖ + eps)`` and weights
    ``wᵢ`` (divided by ``Σ wᵢ`` when ``normalize_weights``): the tangent point is the normalised
    weighted mean ``m = M/‖M‖`` with ``M = Σ wᵢuᵢ``; the tangent vectors ``uᵢ − ⟨uᵢ, m⟩m`` are
    averaged and mapped back with the exponential map, and the result is scaled by the weighted
    mean norm ``Σ wᵢ‖vᵢ‖``. Because the tangent point *is* the weighted mean, the averaged
    tangent vector ``M − ⟨M, m⟩m`` is exactly zero, so the exponential map returns ``m`` itself:
    the result is ``m · Σ wᵢ‖vᵢ‖`` (+ base). We compute this closed form in two streaming passes
    (no N-stack); mergekit 0.1.5 computes the zero tangent explicitly and agrees to rounding.

    When ``‖M‖ < eps`` (e.g. antipodal inputs with balanced weights) two inputs fall back to the
    linear combination ``w₀v₀ + w₁v₁``; more inputs raise :class:`SafemergeError`.
    A single input is returned unchanged.
    """
    n = len(tensors)
    if n == 1:
        return f32(tensors[0]).clone()
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if normalize_weights:
        w = w / nonzero_weight_sum("multislerp", w, "normalize_weights")
    b = f32(base) if base is not None else None

    def vec(i: int) -> torch.Tensor:
        return f32(tensors[i]) - b if b is not None else f32(tensors[i]).clone()

    norms: list[torch.Tensor] = []
    mean = torch.zeros_like(f32(tensors[0]))
    for i in range(n):
        v = vec(i)
        ni = torch.linalg.vector_norm(v.reshape(-1))
        norms.append(ni)
        mean.add_(v.div_(ni + eps).mul_(w[i]))
        del v
    mean_norm = torch.linalg.vector_norm(mean.reshape(-1))
    if mean_norm < eps:
        if n == 2:
            out = vec(0).mul_(w[0]).add_(vec(1).mul_(w[1]))
            return out.add_(b) if b is not None else out
        raise SafemergeError(
            "multislerp: the weighted mean direction of the inputs is zero (antipodal inputs with balancing weights)",
            "use different weights for the antipodal models",
        )
    avg_norm = (torch.stack(norms) * w).sum()
    out = mean.mul_(avg_norm / mean_norm)
    return out.add_(b) if b is not None else out


def multislerp_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``multislerp`` (≥ 1 model, base optional: task vectors when given)."""
    check_inputs("multislerp", tensors, base, base_policy="optional", min_models=1, max_models=None)
    weights = per_model_list("multislerp", per_model, "weight", len(tensors))
    return multislerp(
        tensors, weights, base,
        normalize_weights=bool(params.get("normalize_weights", True)),
        eps=float(params.get("eps", 1e-8)),
    )
