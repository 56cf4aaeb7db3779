"""RAM and RAM+ (tensor-local): merging sparse reinforcement-learning task vectors.

Reinforced Agent Merging (arXiv:2601.13572; mergekit ``ram`` / ``ramplus_tl``). RL fine-tuning
changes few weights, so plain averaging dilutes every update by the number of models. RAM
separates, per entry, the models that actually changed it (``|δᵢ| > ε``):

* no model changed it → the base value;
* exactly one model changed it (*unique*) → that model's update, undiluted;
* several changed it (*shared*) → the mean of their updates.

RAM+ additionally rescales each model's unique updates by ``λᵢ = 1 + r·clip(ρᵢ, 0, α)`` with
``ρᵢ = |shared entries of i| / |unique entries of i|`` counted inside the tensor ("tensor-local").

:func:`ram` (the default kernel) streams the models in three passes — count the models that
changed each entry, (RAM+) count each model's shared and unique entries, accumulate — so memory
holds the base, the output, the counts and one task vector, whatever N. RAM is element-wise (the
engine runs large tensors in row blocks); RAM+'s counts are integers, so :func:`ram_two_pass` adds
them up over row blocks and gives the same bits. :func:`ram_stacked` is
mergekit's order (all N task vectors stacked, reduced over the model axis, with its type
promotion) for ``--mergekit-arithmetic``; in float32 the two agree to rounding (oracle tests).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safemerge.methods._tensor import check_inputs
from safemerge.methods.blocks import TwoPassJob
from safemerge.methods.registry import Param, merge_method

RAM_EPSILON = Param("epsilon", 1e-5, low=0.0, help="|δ| above which a model counts as having changed an entry")
RAM_REFERENCE = "Reinforced Agent Merging (RAM), arXiv:2601.13572: unique updates kept, shared updates averaged"


def _changed(t: torch.Tensor, base: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The task vector ``δ = θ − θ₀`` and its "changed" mask ``|δ| > ε``."""
    delta = t - base
    return delta, delta.abs() > epsilon


def ram(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5,
        r: float | None = None, alpha: float = 0.2) -> torch.Tensor:
    """``θ = θ₀ + Σᵢ δᵢ·[|δᵢ| > ε]·(u·λᵢ + s/c)``, one model at a time.

    ``c`` = number of models with ``|δᵢ| > ε`` at that entry; ``u = (c == 1)``, ``s = (c > 1)``;
    ``λᵢ = 1`` (RAM) or, when ``r`` is given, ``1 + r·clip(ρᵢ, 0, α)`` with
    ``ρᵢ = #(changedᵢ ∧ s) / max(#(changedᵢ ∧ u), ε)`` (RAM+, tensor-local).
    """
    if not tensors:
        return base.clone()
    counts = change_counts(tensors, base, epsilon)
    scales = [1.0] * len(tensors)
    if r is not None:
        tallies = shared_unique_tallies(tensors, base, epsilon, counts)
        scales = [plus_scale(shared, unique, epsilon, r, alpha) for shared, unique in tallies]
    return combine(tensors, base, epsilon, counts, scales)


def change_counts(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per entry, the number ``c`` of models that changed it (``|δᵢ| > ε``; int32)."""
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for t in tensors:
        counts += _changed(t, base, epsilon)[1]
    return counts


def shared_unique_tallies(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float,
                          counts: torch.Tensor) -> list[tuple[int, int]]:
    """Per model, how many of the entries it changed are shared (``c > 1``) and unique (``c = 1``):
    exact integer counts, so they add up over row blocks."""
    shared, unique = counts > 1, counts == 1
    tallies = []
    for t in tensors:
        changed = _changed(t, base, epsilon)[1]
        tallies.append((int((changed & shared).sum()), int((changed & unique).sum())))
    return tallies


def plus_scale(shared: int, unique: int, epsilon: float, r: float, alpha: float) -> float:
    """RAM+'s ``λᵢ = 1 + r·clip(ρᵢ, 0, α)`` with ``ρᵢ = #shared / max(#unique, ε)``."""
    rho = float(shared) / max(float(unique), epsilon)
    return 1 + r * min(max(rho, 0.0), alpha)


def combine(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, counts: torch.Tensor,
            scales: Sequence[float]) -> torch.Tensor:
    """``θ₀ + Σᵢ δᵢ·[|δᵢ| > ε]·(u·λᵢ + s/c)`` from the counts and the scales (element-wise)."""
    shared, unique = counts > 1, counts == 1
    share = shared / counts.clamp(min=1)  # 1/c on shared entries, 0 elsewhere
    merged = torch.zeros_like(base, dtype=torch.promote_types(base.dtype, torch.float32))
    for t, scale in zip(tensors, scales):
        delta, changed = _changed(t, base, epsilon)
        merged += delta * changed * (unique * scale + share)
    del share, counts
    return base + merged


def ram_two_pass(job: TwoPassJob) -> bool:
    """``ramplus_tl`` of a large tensor in row blocks, bit-identical to :func:`ram`: pass 1 adds
    up each model's shared / unique counts block by block (integers: exact), pass 2 combines the
    blocks with the scales. Memory: a few float32 blocks per model and the output."""
    n = job.n
    if n == 0 or len(job.shape) < 2:
        return False
    epsilon, r, alpha = float(job.params["epsilon"]), float(job.params["r"]), float(job.params["alpha"])
    blocks = job.blocks()
    totals = [[0, 0] for _ in range(n)]
    for rows in blocks:
        b, ts = job.load_base(rows), [job.load(i, rows) for i in range(n)]
        for total, tally in zip(totals, shared_unique_tallies(ts, b, epsilon, change_counts(ts, b, epsilon))):
            total[0] += tally[0]
            total[1] += tally[1]
    scales = [plus_scale(shared, unique, epsilon, r, alpha) for shared, unique in totals]
    for rows in blocks:
        b, ts = job.load_base(rows), [job.load(i, rows) for i in range(n)]
        job.emit(rows, combine(ts, b, epsilon, change_counts(ts, b, epsilon), scales))
    return True


def _contributions(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, ...]:
    """Flattened task vectors with the entries ``≤ ε`` zeroed, the "changed" mask and the per-entry
    count of models that changed it (``1 × numel``)."""
    deltas = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas * changed, changed, counts


def ram_stacked(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5,
                r: float | None = None, alpha: float = 0.2) -> torch.Tensor:
    """:func:`ram` evaluated in mergekit's order: the N task vectors stacked, reduced over them."""
    if not tensors:
        return base
    zeroed, changed, counts = _contributions(tensors, base, epsilon)
    shared, unique = counts > 1, counts == 1
    unique_part = zeroed * unique
    if r is not None:
        n_shared = (changed & shared).sum(dim=1)
        n_unique = (changed & unique).sum(dim=1)
        rho = n_shared / n_unique.clamp(min=epsilon)
        unique_part = unique_part * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (unique_part + zeroed * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def _entry(kernel, name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None,  # noqa: ANN001
           params: dict[str, Any]) -> torch.Tensor:
    assert base is not None
    plus = {"r": float(params["r"]), "alpha": float(params["alpha"])} if name == "ramplus_tl" else {}
    return kernel(tensors, base, epsilon=float(params["epsilon"]), **plus)


@merge_method(
    "ram", params=(RAM_EPSILON,), base="required", min_models=0, reference=RAM_REFERENCE,
    base_in_tensors=False, elementwise=True,
)
def ram_fn(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
           params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Registry entry for ``ram`` (streaming)."""
    return _entry(ram, "ram", tensors, base, params)


@merge_method(
    "ramplus_tl",
    params=(
        Param("r", 0.1, low=0.0, help="strength of the rescaling of unique updates"),
        Param("alpha", 0.2, low=0.0, help="cap on the shared/unique ratio rho"),
        RAM_EPSILON,
    ),
    base="required", min_models=0,
    reference=RAM_REFERENCE + "; RAM+ scales unique updates by 1 + r·clip(ρ, 0, α) (tensor-local ρ)",
    base_in_tensors=False,
)
def ramplus_tl_fn(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
                  params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Registry entry for ``ramplus_tl`` (streaming)."""
    return _entry(ram, "ramplus_tl", tensors, base, params)


def ram_mergekit_order(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
                       params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit-order kernel for ``ram`` (:mod:`safemerge.methods.mergekit_order`)."""
    check_inputs("ram", tensors, base, base_policy="required", min_models=0, max_models=None)
    return _entry(ram_stacked, "ram", tensors, base, params)


def ramplus_tl_mergekit_order(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *,
                              per_model: dict[str, list[Any]], params: dict[str, Any],
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """mergekit-order kernel for ``ramplus_tl``."""
    check_inputs("ramplus_tl", tensors, base, base_policy="required", min_models=0, max_models=None)
    return _entry(ram_stacked, "ramplus_tl", tensors, base, params)
