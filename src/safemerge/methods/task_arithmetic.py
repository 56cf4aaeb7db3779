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
from functools import partial
from typing import Any, Callable

import torch

from safemerge.methods._tensor import InputTensors, check_inputs, f32, per_model_list, release
from safemerge.methods import sparsify as sp

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


def sparsify_delta(
    delta: torch.Tensor,
    method: str | None,
    *,
    density: float,
    rescale: bool,
    gamma: float = 0.01,
    epsilon: float = 0.15,
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


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    sparsification: str | None = None,
    consensus: bool = False,
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
    tie_break: str = "index",
) -> torch.Tensor:
    """``θ_base + λ · merge(wᵢ · sparsify(θᵢ − θ_base))`` — see the module docstring for the steps.

    Without consensus the weighted deltas are accumulated one at a time (O(1) temporaries); with
    consensus the N weighted deltas are kept until the sign is elected. The normaliser is
    ``Σ wᵢ`` (replaced by 1 when ``|Σ wᵢ| < 1e-8``) without consensus, and the per-entry sum of
    the agreeing weights (1 where none agree) with consensus, exactly as mergekit 0.1.5.
    """
    base = f32(base)
    n = len(tensors)
    if n == 0:
        return base.clone()
    densities = list(densities) if densities is not None else [1.0] * n
    gammas = list(gammas) if gammas is not None else [0.01] * n
    epsilons = list(epsilons) if epsilons is not None else [0.15] * n
    w32 = torch.tensor([float(w) for w in weights], dtype=torch.float32)

    owned = isinstance(tensors, InputTensors)

    def weighted_delta(i: int) -> torch.Tensor:
        t = f32(tensors[i])
        # an input handed over by the engine becomes its own task vector (no second buffer)
        delta = t.sub_(base) if owned and t is tensors[i] and t is not base else t - base
        release(tensors, i)
        delta = sparsify_delta(
            delta, sparsification, density=float(densities[i]), rescale=rescale,
            gamma=float(gammas[i]), epsilon=float(epsilons[i]), generator=generator, inplace=True,
            tie_break=tie_break,
        )
        return delta.mul_(w32[i])

    if not consensus:
        mixed = weighted_delta(0)
        for i in range(1, n):
            mixed.add_(weighted_delta(i))
        if normalize:
            divisor = w32.sum()
            if divisor.abs() < 1e-8:
                divisor = torch.ones((), dtype=torch.float32)
            mixed.div_(divisor)
    else:
        deltas = [weighted_delta(i) for i in range(n)]
        mixed = disjoint_merge(deltas, w32, normalize)
    if lam != 1:
        mixed.mul_(float(lam))
    return mixed.add_(base)


def disjoint_merge(deltas: list[torch.Tensor], w32: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES "Elect" + "Disjoint merge" (Yadav et al. 2023, Sec. 3) of weighted task vectors.

    Elect: ``γ = sgn(Σᵢ wᵢτ̂ᵢ)`` (0 → +). Disjoint merge: the mean of the entries whose sign is
    ``γ``, normalised by the per-entry sum of the agreeing weights (1 where none agree) when
    ``normalize``, exactly as mergekit 0.1.5. Consumes ``deltas`` (entries become ``None``).
    """
    n = len(deltas)
    # the election sum is accumulated in the output buffer, which is then reused for the mean
    mixed = deltas[0].clone()
    for d in deltas[1:]:
        mixed.add_(d)
    sign = mixed.ge(0).to(torch.float32).mul_(2).sub_(1)  # elected sign γ as ±1 (0 → +)
    mixed.zero_()
    divisor = torch.zeros_like(mixed) if normalize else None
    for i in range(n):
        # with δ·γ the agreeing entries become |δ| (> 0) and the others ≤ 0, so one clamp selects
        # them; summing magnitudes and restoring γ afterwards is exact (negation commutes with
        # rounding)
        d = deltas[i].mul_(sign)  # in place: this delta is not needed afterwards
        if divisor is not None:
            divisor.add_(d > 0, alpha=float(w32[i]))
        mixed.add_(d.clamp_(min=0))
        deltas[i] = None  # type: ignore[call-overload]  # free as we go
    mixed.mul_(sign)
    del sign
    if divisor is not None:
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    return mixed


def ties_two_pass(
    load: Callable[[int, tuple[int, int] | None], torch.Tensor],
    load_base: Callable[[tuple[int, int] | None], torch.Tensor],
    n: int,
    shape: tuple[int, ...],
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    block_bytes: int = 32 << 20,
) -> torch.Tensor | None:
    """TIES (Yadav et al. 2023, Alg. 1) for large tensors in two passes, bit-identical to the
    whole-tensor computation with index-ordered ties.

    Pass 1 reads one model at a time and keeps only its top-k threshold (and, when exactly equal
    magnitudes straddle the cut-off, the flat index from which tied entries survive). Pass 2
    recomputes the task vectors in row blocks, masks them with the thresholds and runs the
    sign election and disjoint merge block by block. Peak memory is the base plus one task
    vector and its selection temporaries, instead of the base plus all N task vectors.
    ``load(i, rows)`` / ``load_base(rows)`` return float32 tensors (rows ``None`` = all).
    Returns ``None`` (caller falls back) for settings it does not cover (``rescale``).
    """
    import math

    from safemerge.methods._tensor import kth_smallest

    if n == 0 or bool(params.get("rescale", False)) or len(shape) < 2:
        return None
    numel = math.prod(shape)
    weights = per_model_list("ties", per_model, "weight", n)
    densities = [float(d) for d in (per_model.get("density") or [1.0] * n)]
    w32 = torch.tensor([float(w) for w in weights], dtype=torch.float32)
    cuts: list[tuple[torch.Tensor, int] | None] = []
    base = load_base(None)
    for i in range(n):
        if densities[i] >= 1:
            cuts.append(None)
            continue
        a = load(i, None).sub_(base).abs_().reshape(-1)
        k = max(1, int(densities[i] * numel))
        lo = kth_smallest(a, numel - k + 1)
        need = k - int(torch.count_nonzero(a > lo))
        eq = a == lo
        n_eq = int(torch.count_nonzero(eq))
        first_kept = 0 if need == n_eq else int(torch.nonzero(eq).squeeze(1)[n_eq - need])
        cuts.append((lo, first_kept))
        del a, eq
    del base
    cols = math.prod(shape[1:])
    rows = max(1, block_bytes // (4 * cols))
    out = torch.empty(shape, dtype=torch.float32)
    lam = float(params.get("lambda", 1.0))
    for r0 in range(0, shape[0], rows):
        blk = (r0, min(shape[0], r0 + rows))
        b = load_base(blk)
        deltas = []
        for i in range(n):
            d = load(i, blk).sub_(b)
            if cuts[i] is not None:
                lo, first_kept = cuts[i]
                a = d.abs()
                keep = a > lo
                if first_kept:
                    idx = torch.arange(blk[0] * cols, blk[1] * cols, dtype=torch.int64).view(d.shape)
                    keep |= (a == lo) & (idx >= first_kept)
                else:
                    keep |= a == lo
                d.mul_(keep)
            deltas.append(d.mul_(w32[i]))
        mixed = disjoint_merge(deltas, w32, bool(params.get("normalize", True)))
        if lam != 1:
            mixed.mul_(lam)
        out[blk[0] : blk[1]] = mixed.add_(b)
    return out


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
    sparsification, consensus, normalize_default, rescale_default = FAMILY[name]
    check_inputs(name, tensors, base, base_policy="required", min_models=0, max_models=None)
    assert base is not None
    n = len(tensors)
    if n == 0:
        return f32(base).clone()
    weights = per_model_list(name, per_model, "weight", n)
    densities = per_model.get("density") or [1.0] * n
    gammas = per_model.get("gamma") if sparsification == "magnitude_outliers" else None
    epsilons = per_model.get("epsilon") if sparsification == "della_magprune" else None
    return generalized_task_arithmetic(
        tensors,
        base,
        weights,
        sparsification=sparsification,
        consensus=consensus,
        densities=densities,
        gammas=gammas,
        epsilons=epsilons,
        normalize=bool(params.get("normalize", normalize_default)),
        rescale=bool(params.get("rescale", rescale_default)),
        lam=float(params.get("lambda", 1.0)),
        generator=generator,
        tie_break=tie_break,
    )
