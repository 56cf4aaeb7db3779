"""Linear merge (model soups) and passthrough."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import f32, nonzero_weight_sum, per_model_list
from safemerge.methods.mergekit_params import WEIGHT
from safemerge.methods.registry import Param, merge_method


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted average ``θ = Σᵢ wᵢθᵢ / Σᵢ wᵢ`` (or the plain weighted sum without ``normalize``).

    Wortsman et al. 2022, "Model soups", Sec. 3 (uniform soup ``θ = (1/k) Σᵢ θᵢ``), with
    per-model weights as in mergekit. Accumulates one input at a time in float32. mergekit 0.1.5
    divides by a zero weight sum and writes ±inf; we raise :class:`~safemerge.errors.ConfigError` instead.
    """
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    out = torch.zeros_like(f32(tensors[0]))
    for t, wi in zip(tensors, w.tolist()):
        out.add_(f32(t), alpha=wi)  # fused, no temporary
    if normalize:
        out.div_(nonzero_weight_sum("linear", w, "normalize: true"))
    return out


@merge_method(
    "linear",
    params=(WEIGHT, Param("normalize", True, kind=bool, help="divide by the sum of the weights")),
    base="none", min_models=1,
    reference="Wortsman et al. 2022, Model soups (ICML), Sec. 3: θ = Σ wᵢθᵢ / Σ wᵢ",
    base_in_tensors=True, elementwise=True,
)
def linear_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``linear``: ``tensors`` holds every input, the base included."""
    weights = per_model_list("linear", per_model, "weight", len(tensors))
    return linear_merge(tensors, weights, normalize=bool(params.get("normalize", True)))


@merge_method(
    "passthrough",
    params=(Param("scale", None, per_model=True, help="optional factor applied to the copied tensor"),),
    base="none", min_models=1, max_models=1,
    reference="Goddard et al. 2024, Arcee's MergeKit (EMNLP industry), passthrough / frankenmerging",
    base_in_tensors=True, elementwise=True,
)
def passthrough_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Registry entry for ``passthrough``: copy the single input, times an optional ``scale``.

    Frankenmerging (Goddard et al. 2024, "Arcee's MergeKit", Sec. 3.3 "passthrough"): the tensor
    is copied unchanged unless a per-model ``scale`` is set (``θ = s·θ₁``). Returns a copy,
    never the input object.
    """
    scale = (per_model.get("scale") or [None])[0]
    t = f32(tensors[0])
    return t.clone() if scale is None else t * float(scale)
