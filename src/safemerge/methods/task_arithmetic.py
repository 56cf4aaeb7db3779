"""The task-arithmetic family: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della, della_linear.

All are one computation (mergekit's "generalized task arithmetic"):

1. task vectors ``δᵢ = θᵢ − θ_base`` (Ilharco et al. 2023, "Editing Models with Task
   Arithmetic", Eq. 1);
2. optional sparsification of each ``δᵢ`` (magnitude / random / magnitude_outliers /
   della_magprune, see :mod:`safemerge.methods.sparsify`), optionally rescaled to its L1 norm;
3. weighting ``wᵢ·δᵢ``;
4. optional sign consensus (TIES "Elect" + "Disjoint merge", Yadav et al. 2023, Eq. in Sec. 3:
   ``γ = sgn(Σᵢ wᵢδᵢ)``; only entries whose sign agrees with ``γ`` are summed);
5. optional normalisation by the sum of the (agreeing) weights, scaling by ``λ``;
6. ``θ = θ_base + λ·δ``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from safemerge.methods import sparsify as sp
from safemerge.methods._tensor import check_inputs, f32, per_model_list
from safemerge.methods.blocks import InputTensors, release
from safemerge.methods.mergekit_params import (
    DENSITY,
    EPSILON,
    GAMMA,
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    normalize_param,
    rescale_param,
)
from safemerge.methods.registry import MergeMethod, register

DEFAULT_GAMMA = GAMMA.default  # Breadcrumbs' outlier fraction when a model gives none
DEFAULT_EPSILON = EPSILON.default  # DELLA's probability spread when a model gives none

#: name -> (sparsification, consensus, normalize default, rescale default), as in mergekit 0.1.5.
FAMILY: dict[str, tuple[str | None, bool, bool, bool]] = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}

REFERENCES = {
    "task_arithmetic": "Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR), Eq. 1: θ = θ_base + λ Σ wᵢ τᵢ",
    "ties": "Yadav et al. 2023, TIES-Merging (NeurIPS), Sec. 3 / Alg. 1: trim (top-k |τ|), elect sign, disjoint mean",
    "dare_ties": "Yu et al. 2024, Language Models are Super Mario (DARE, ICML), Sec. 3 drop-and-rescale + TIES sign "
                 "election",
    "dare_linear": "Yu et al. 2024, Language Models are Super Mario (DARE, ICML), Sec. 3 drop-and-rescale + task "
                   "arithmetic",
    "breadcrumbs": "Davari & Belilovsky 2024, Model Breadcrumbs (ECCV), Sec. 3: mask top-γ outliers and small entries",
    "breadcrumbs_ties": "Davari & Belilovsky 2024, Model Breadcrumbs (ECCV), Sec. 3 + TIES sign election (Yadav et al. "
                        "2023)",
    "della": "Deep et al. 2024, DELLA-Merging, Sec. 3: MagPrune (rank-based keep probabilities), elect sign, fuse",
    "della_linear": "Deep et al. 2024, DELLA-Merging, Sec. 3: MagPrune + task arithmetic (no sign election)",
}
"""name -> the paper (and section) each family member implements."""


def sparsify_delta(
    delta: torch.Tensor,
    method: str | None,
    *,
    density: float,
    rescale: bool,
    gamma: float = DEFAULT_GAMMA,
    epsilon: float = DEFAULT_EPSILON,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    tie_break: str = "index",
) -> torch.Tensor:
    """Apply the named sparsifier to one task vector (``None`` = keep everything).

    ``inplace``: the caller owns ``delta`` and it may be masked in place (saves a buffer)."""
    if method is None:
        return delta
    if method == "magnitude":
        return sp.magnitude(delta, density, rescale=rescale, inplace=inplace, tie_break=tie_break)
    if method == "random":
        return sp.random_drop(delta, density, rescale=rescale, generator=generator)
    if method == "magnitude_outliers":
        return sp.magnitude_outliers(delta, density, gamma, rescale=rescale, inplace=inplace, tie_break=tie_break)
    if method == "della_magprune":
        return sp.della_magprune(delta, density, epsilon, rescale=rescale, generator=generator)
    raise ValueError(f"unknown sparsification method {method!r}")


def majority_sign_positive(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election (Yadav et al. 2023, Sec. 3 "Elect"): ``γ = sgn(Σᵢ wᵢδᵢ)``, ties → +.

    Returns a boolean tensor, ``True`` where the elected sign is positive (sum ≥ 0).
    """
    total = weighted_deltas[0].clone()
    for d in weighted_deltas[1:]:
        total.add_(d)
    return total.ge_(0).to(torch.bool)


def agrees(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Entries whose sign equals the elected sign (zeros never agree)."""
    return torch.where(positive, delta > 0, delta < 0)


@dataclass(frozen=True)
class FamilySettings:
    """One tensor's resolved settings of a family method: the arguments of
    :func:`generalized_task_arithmetic` from the registry's ``per_model`` / ``params``, with the
    method's defaults (:data:`FAMILY`) filled in. The whole-tensor function and the row-block
    kernel (:mod:`safemerge.methods.task_arithmetic_two_pass`) read them from here."""

    sparsification: str | None
    consensus: bool
    weights: list[float]
    densities: list[float]
    gammas: list[float]
    epsilons: list[float]
    normalize: bool
    rescale: bool
    lam: float

    @classmethod
    def resolve(cls, name: str, per_model: dict[str, list[Any]], params: dict[str, Any], n: int) -> FamilySettings:
        sparsification, consensus, normalize_default, rescale_default = FAMILY[name]

        def values(key: str, default: float, used: bool) -> list[float]:
            given = per_model.get(key) if used else None
            return [float(v) for v in given] if given else [default] * n

        return cls(
            sparsification=sparsification,
            consensus=consensus,
            weights=[float(w) for w in per_model_list(name, per_model, "weight", n)],
            densities=values("density", 1.0, True),
            gammas=values("gamma", DEFAULT_GAMMA, sparsification == "magnitude_outliers"),
            epsilons=values("epsilon", DEFAULT_EPSILON, sparsification == "della_magprune"),
            normalize=bool(params.get("normalize", normalize_default)),
            rescale=bool(params.get("rescale", rescale_default)),
            lam=float(params.get("lambda", 1.0)),
        )


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    settings: FamilySettings,
    *,
    generator: torch.Generator | None = None,
    tie_break: str = "index",
) -> torch.Tensor:
    """``θ_base + λ · merge(wᵢ · sparsify(θᵢ − θ_base))`` — see the module docstring for the steps.

    ``settings``: the family member's sparsification and consensus, the per-model weights, densities, γ and ε,
    normalisation, rescaling and λ (:class:`FamilySettings`). Without consensus the weighted deltas are accumulated
    one at a time (O(1) temporaries); with consensus the N weighted deltas are kept until the sign is elected. The
    normaliser is ``Σ wᵢ`` (replaced by 1 when ``|Σ wᵢ| < 1e-8``) without consensus, and the per-entry sum of
    the agreeing weights (1 where none agree) with consensus, exactly as mergekit 0.1.5.
    """
    base = f32(base)
    if len(tensors) == 0:
        return base.clone()
    s = settings
    w32 = torch.tensor(s.weights, dtype=torch.float32)

    owned = isinstance(tensors, InputTensors)

    def weighted_delta(i: int) -> torch.Tensor:
        t = f32(tensors[i])
        # an input handed over by the engine becomes its own task vector (no second buffer)
        delta = t.sub_(base) if owned and t is tensors[i] and t is not base else t - base
        release(tensors, i)
        delta = sparsify_delta(
            delta, s.sparsification, density=s.densities[i], rescale=s.rescale,
            gamma=s.gammas[i], epsilon=s.epsilons[i], generator=generator, inplace=True,
            tie_break=tie_break,
        )
        return delta.mul_(w32[i])

    return merge_weighted_deltas(weighted_delta, w32, base, consensus=s.consensus, normalize=s.normalize, lam=s.lam)


def merge_weighted_deltas(
    weighted_delta: Callable[[int], torch.Tensor],
    w32: torch.Tensor,
    base: torch.Tensor,
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """Steps 4–6 of the module docstring: ``θ_base + λ·merge(wᵢ·δ̃ᵢ)`` from the weighted, sparsified
    task vectors ``weighted_delta(i)`` (owned by the callee), for the whole tensor or one row block.

    Without consensus they are summed one at a time (O(1) temporaries) and divided by ``Σ wᵢ``
    (1 when ``|Σ wᵢ| < 1e-8``) when ``normalize``; with consensus all N are kept for the sign
    election (:func:`disjoint_merge`)."""
    n = w32.numel()
    if not consensus:
        mixed = weighted_delta(0)
        for i in range(1, n):
            mixed.add_(weighted_delta(i))
        if normalize:
            mixed.div_(weight_sum_divisor(w32))
    else:
        mixed = disjoint_merge([weighted_delta(i) for i in range(n)], w32, normalize)
    if lam != 1:
        mixed.mul_(float(lam))
    return mixed.add_(base)


def weight_sum_divisor(w32: torch.Tensor) -> torch.Tensor:
    """``Σ wᵢ``, the normaliser of a merge without consensus — 1 when ``|Σ wᵢ| < 1e-8``."""
    divisor = w32.sum()
    return torch.ones((), dtype=torch.float32) if divisor.abs() < 1e-8 else divisor


def disjoint_merge(deltas: list[torch.Tensor], w32: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES "Elect" + "Disjoint merge" (Yadav et al. 2023, Sec. 3) of weighted task vectors.

    Elect: ``γ = sgn(Σᵢ wᵢτ̂ᵢ)`` (0 → +). Disjoint merge: the mean of the entries whose sign is
    ``γ``, normalised by the per-entry sum of the agreeing weights (1 where none agree) when
    ``normalize``, exactly as mergekit 0.1.5. Consumes ``deltas`` (entries become ``None``).
    Only float operations (no boolean masks, which cost several times more per entry); NaN
    entries stay NaN.
    """
    n = len(deltas)
    # the election sum is accumulated in the output buffer, which is then reused for the mean
    mixed = deltas[0].clone()
    for d in deltas[1:]:
        mixed.add_(d)
    # elected sign γ as ±1: copysign of the sum with −0 turned into +0 (0 → +)
    sign = torch.copysign(torch.ones((), dtype=mixed.dtype, device=mixed.device), mixed.add_(0.0))
    mixed.zero_()
    divisor = torch.zeros_like(mixed) if normalize else None
    for i in range(n):
        # with δ·γ the agreeing entries become |δ| (> 0) and the others ≤ 0, so one clamp selects
        # them; summing magnitudes and restoring γ afterwards is exact (negation commutes with
        # rounding)
        d = deltas[i].mul_(sign).clamp_(min=0)  # in place: this delta is not needed afterwards
        if divisor is not None:
            divisor.add_(torch.sign(d), alpha=float(w32[i]))  # sign(clamped δ·γ) = 1 where it agrees, else 0
        mixed.add_(d)
        deltas[i] = None  # type: ignore[call-overload]  # free as we go
    mixed.mul_(sign)
    del sign
    if divisor is not None:
        divisor.add_(torch.sign(divisor).abs_().neg_().add_(1))  # 0 → 1 (no agreeing model), others + 0
        mixed.div_(divisor)
    return mixed



def task_arithmetic_family_fn(name: str) -> Callable[..., torch.Tensor]:
    """The registry function (``fn(tensors, base, *, per_model, params, generator)``) for ``name``."""
    return partial(_family_entry, name)


def _family_entry(
    name: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    generator: torch.Generator | None = None,
    tie_break: str = "index",
) -> torch.Tensor:
    check_inputs(name, tensors, base, base_policy="required", min_models=0, max_models=None)
    assert base is not None
    n = len(tensors)
    if n == 0:
        return f32(base).clone()
    settings = FamilySettings.resolve(name, per_model, params, n)
    return generalized_task_arithmetic(tensors, base, settings, generator=generator, tie_break=tie_break)


def _family_method(name: str) -> MergeMethod:
    """The declaration of one family member, from its row of :data:`FAMILY` (mergekit 0.1.5's parameters)."""
    sparsification, _consensus, normalize_default, rescale_default = FAMILY[name]
    params = (INT8_MASK, normalize_param(normalize_default), rescale_param(rescale_default), LAMBDA, WEIGHT, DENSITY)
    if sparsification == "magnitude_outliers":
        params += (GAMMA,)
    if sparsification == "della_magprune":
        params += (EPSILON,)
    return MergeMethod(
        name=name, fn=task_arithmetic_family_fn(name), params=params, base="required", min_models=0,
        stochastic=sparsification in ("random", "della_magprune"), reference=REFERENCES[name],
        extra={
            "base_in_tensors": False,
            # exact ties at top-k cut-offs: the engine passes the plan's tie_break rule
            "tie_break": sparsification in ("magnitude", "magnitude_outliers"),
            # no sparsification and no sign election: every output entry depends only on the
            # same entry of the inputs, so the engine may process large tensors in row blocks
            "elementwise": name == "task_arithmetic",
        },
    )


for _name in FAMILY:  # the family is declared here, beside its function, one record per row of FAMILY
    register(_family_method(_name))
