"""Karcher (Riemannian / Fréchet) mean of the inputs' directions on the unit hypersphere."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import dot64, f32
from safemerge.methods.registry import Param, merge_method


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    alphas: Sequence[float] | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher mean of unit directions, rescaled by the weighted mean norm.

    Karcher 1977, "Riemannian center of mass and mollifier smoothing"; fixed-point iteration of
    Buss & Fillmore 2001, "Spherical averages…", Sec. 3:
    ``m ← exp_m(Σᵢ αᵢ · θᵢ/sin θᵢ · (uᵢ − cos θᵢ · m))`` with ``uᵢ = xᵢ/‖xᵢ‖``,
    ``cos θᵢ = ⟨m, uᵢ⟩``, starting from the normalised weighted mean of the ``uᵢ`` (or ``u₀`` if
    that is ~0), stopping after ``max_iter`` steps or when the tangent norm is below ``tol``.
    Inputs with ``‖xᵢ‖ ≤ tol`` are left out of the direction (weights renormalised over the
    others); the result is ``(Σᵢ αᵢ‖xᵢ‖) · m`` over *all* inputs; all-zero inputs give zeros.
    ``alphas`` default to ``1/N`` — mergekit's ``karcher`` always uses equal weights.
    Unit vectors are recomputed on the fly, so memory is O(1) tensors besides the inputs.
    """
    n = len(tensors)
    xs = [f32(t) for t in tensors]
    if n == 1:
        return xs[0].clone()
    alphas = [1.0 / n] * n if alphas is None else [float(a) for a in alphas]
    norms = [torch.linalg.vector_norm(x.reshape(-1)) for x in xs]
    valid = [i for i in range(n) if norms[i].item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    coef = {i: alphas[i] / total for i in valid}

    def unit(i: int) -> torch.Tensor:
        return xs[i] / norms[i]

    mean = torch.zeros_like(xs[0])
    for i in valid:
        mean.add_(unit(i).mul_(coef[i]))
    mean_norm = torch.linalg.vector_norm(mean.reshape(-1))
    mean = unit(valid[0]) if mean_norm.item() < tol else mean.div_(mean_norm)

    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        mflat = mean.reshape(-1)
        for i in valid:
            u = unit(i)
            dot = dot64(mflat, u).float().clamp(-1.0, 1.0)  # float64 accumulation
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            u.sub_(mean * dot).mul_(coef[i] * (theta / torch.sin(theta)))
            tangent.add_(u)
            del u
        tangent_norm = torch.linalg.vector_norm(tangent.reshape(-1))
        if tangent_norm.item() < tol:
            break
        mean = mean.mul_(torch.cos(tangent_norm)).add_(tangent.mul_(torch.sin(tangent_norm) / tangent_norm))
        unit_norm = torch.linalg.vector_norm(mean.reshape(-1))
        if unit_norm.item() > tol:
            mean.div_(unit_norm)
    scale = sum(alphas[i] * norms[i] for i in range(n))
    return mean.mul_(scale)


@merge_method(
    "karcher",
    params=(
        Param("max_iter", 10, kind=int, low=0, help="maximum fixed-point iterations"),
        Param("tol", 1e-5, low=0.0, help="convergence tolerance on the tangent norm"),
    ),
    base="none", min_models=1,
    reference="Karcher 1977, Riemannian center of mass; Buss & Fillmore 2001 fixed-point iteration (equal weights)",
    base_in_tensors=True,
)
def karcher_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``karcher``: equal weights over all inputs (base included, see docs)."""
    return karcher_mean(tensors, None, max_iter=int(params.get("max_iter", 10)), tol=float(params.get("tol", 1e-5)))
