"""Multi-SLERP: barycentric spherical interpolation of N models (optionally of task vectors)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.errors import SafemergeError
from safemerge.methods._tensor import f32, nonzero_weight_sum, per_model_list
from safemerge.methods.blocks import TwoPassJob
from safemerge.methods.mergekit_params import WEIGHT
from safemerge.methods.registry import Param, merge_method


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
    w = multislerp_weights(weights, normalize_weights)
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


def multislerp_weights(weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """The weights as a float32 tensor, divided by their sum when ``normalize``."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    return w / nonzero_weight_sum("multislerp", w, "normalize_weights") if normalize else w


def multislerp_two_pass(job: TwoPassJob) -> bool:
    """:func:`multislerp` of N task vectors of a large tensor in row blocks, bit-identical to the
    whole tensor: each ‖vᵢ‖ and then ‖M‖ are float32 norms over one tensor-sized scratch buffer
    filled block by block (the reductions' bits depend on the tensor's length, not on how it was
    filled), and ``M = Σ wᵢ vᵢ/(‖vᵢ‖ + eps)`` stays in that buffer until it is scaled and written
    block by block. Reads every input twice; memory: the scratch buffer, a few blocks and the
    output. A (near-)zero ``M`` is left to the whole tensor (its linear fallback or error)."""
    n, load, load_base = job.n, job.load, job.load_base
    if n < 2 or len(job.shape) < 2:
        return False
    w = multislerp_weights(per_model_list("multislerp", job.per_model, "weight", n),
                           bool(job.params.get("normalize_weights", True)))
    eps = float(job.params.get("eps", 1e-8))
    blocks = job.blocks()
    mean = torch.empty(job.shape, dtype=torch.float32)
    norms = []
    for i in range(n):
        for r0, r1 in blocks:
            torch.sub(load(i, (r0, r1)), load_base((r0, r1)), out=mean[r0:r1])
        norms.append(torch.linalg.vector_norm(mean.reshape(-1)))
    for r0, r1 in blocks:
        b, m = load_base((r0, r1)), mean[r0:r1].zero_()
        for i in range(n):
            m.add_(load(i, (r0, r1)).sub_(b).div_(norms[i] + eps).mul_(w[i]))
    mean_norm = torch.linalg.vector_norm(mean.reshape(-1))
    if mean_norm < eps:
        return False
    scale = (torch.stack(norms) * w).sum() / mean_norm
    for r0, r1 in blocks:
        job.emit((r0, r1), mean[r0:r1].mul_(scale).add_(load_base((r0, r1))))
    return True


@merge_method(
    "multislerp",
    params=(
        WEIGHT,
        Param("normalize_weights", True, kind=bool, help="divide the weights by their sum"),
        Param("eps", 1e-8, low=0.0, help="small constant added to norms"),
    ),
    base="optional", min_models=1,
    reference="Goddard 2025, Multi-SLERP; Buss & Fillmore 2001, Spherical averages: barycentric interpolation on "
              "the sphere",
    base_in_tensors=False,
)
def multislerp_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``multislerp`` (≥ 1 model, base optional: task vectors when given)."""
    weights = per_model_list("multislerp", per_model, "weight", len(tensors))
    return multislerp(
        tensors, weights, base,
        normalize_weights=bool(params.get("normalize_weights", True)),
        eps=float(params.get("eps", 1e-8)),
    )
