"""NearSwap: move the base toward a second model only where the two are already close."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import f32
from safemerge.methods.registry import Param, merge_method


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """``θ = w·θ_other + (1 − w)·θ_base`` with ``w = clamp(t / max(|θ_base − θ_other|, 1e-6), 0, 1)``.

    NearSwap (alchemonaut 2024, model card of QuartetAnemoi-70B-t0.0001; mergekit ``nearswap``):
    entries closer than ``t`` are swapped to the other model entirely, farther ones move by
    ``t/|Δ|``. The distance is clamped at 1e-6 before the division.
    """
    a, b = f32(base), f32(other)
    diff = (a - b).abs_().clamp_(min=1e-6)
    w = (float(t) / diff).clamp_(0, 1)
    del diff
    # w·b + (1 − w)·a  ==  a + w·(b − a)
    return torch.lerp(a, b, w)


@merge_method(
    "nearswap",
    params=(Param("t", low=0.0, help="distance below which entries are swapped to the other model (> 0)"),),
    base="required", min_models=1, max_models=1,
    reference="alchemonaut 2024, NearSwap (QuartetAnemoi-70B-t0.0001 model card): w = clamp(t/|Δ|, 0, 1)",
    base_in_tensors=False, elementwise=True,
)
def nearswap_fn(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``nearswap`` on the base and exactly one other model (arity and ``t`` checked from the declaration)."""
    return nearswap(base, tensors[0], float(params["t"]))
