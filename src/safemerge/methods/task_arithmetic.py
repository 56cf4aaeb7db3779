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

from safemerge.methods import sparsify as sp
from safemerge.methods._tensor import (
    BaseRowLoader,
    BlockSink,
    InputTensors,
    RowLoader,
    Rows,
    check_inputs,
    f32,
    per_model_list,
    release,
    row_blocks,
)

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



def ties_two_pass(
    load: RowLoader,
    load_base: BaseRowLoader,
    n: int,
    shape: tuple[int, ...],
    per_model: dict[str, list[Any]],
    params: dict[str, Any],
    block_bytes: int,
    emit: BlockSink,
) -> bool:
    """TIES (Yadav et al. 2023, Alg. 1) for large tensors in row blocks, bit-identical to the
    whole-tensor computation with index-ordered ties.

    Pass 1 finds each model's top-k threshold of ``|θᵢ − θ_base|`` (and, when exactly equal
    magnitudes straddle the cut-off, the flat index from which tied entries survive) with a
    :class:`~safemerge.methods._tensor.StreamedKth`: a sample of spread-out row ranges, then one
    scan over the row blocks that counts and keeps only the candidates near the threshold.
    Pass 2 recomputes the task vectors block by block, masks them (:func:`_trim_block`), and runs the sign election
    and disjoint merge per block. Memory: a few blocks plus the candidates — never a whole task
    vector. ``load(i, rows)`` / ``load_base(rows)`` return float32 tensors (rows ``None`` =
    all); each finished float32 block goes to ``emit(rows, block)``. Returns ``False`` (the
    caller falls back to the whole tensor) for settings it does not cover (``rescale``).
    """
    if n == 0 or bool(params.get("rescale", False)) or len(shape) < 2:
        return False
    weights = per_model_list("ties", per_model, "weight", n)
    densities = [float(d) for d in (per_model.get("density") or [1.0] * n)]
    w32 = torch.tensor([float(w) for w in weights], dtype=torch.float32)
    blocks = row_blocks(shape, block_bytes)
    cuts = _topk_cuts(load, load_base, densities, shape, blocks)
    lam = float(params.get("lambda", 1.0))
    normalize = bool(params.get("normalize", True))
    dropped = [cut[1] if cut is not None else 0 for cut in cuts]  # tied entries still to drop, in flat order
    for blk in blocks:
        b = load_base(blk)
        deltas = []
        for i in range(n):
            d = load(i, blk).sub_(b)
            cut = cuts[i]
            if cut is not None:
                dropped[i] = _trim_block(d, cut[0], dropped[i])
            deltas.append(d.mul_(w32[i]))
        mixed = disjoint_merge(deltas, w32, normalize)
        if lam != 1:
            mixed.mul_(lam)
        emit(blk, mixed.add_(b))
    return True


def _topk_cuts(
    load: RowLoader,
    load_base: BaseRowLoader,
    densities: list[float],
    shape: tuple[int, ...],
    blocks: list[Rows],
) -> list[tuple[torch.Tensor, int] | None]:
    """Per model: ``(threshold, number of entries equal to it that are dropped)`` of TIES's
    top-``k`` trim, ``k = max(1, ⌊density·n⌋)``, ties at the cut-off kept from the highest flat
    index down (:func:`~safemerge.methods._tensor.rank_window_mask`'s ``index`` rule);
    ``None`` where ``density ≥ 1``. Streams the blocks; falls back to a whole-tensor selection
    for a model whose sample bracket missed."""
    import math

    from safemerge.methods._tensor import StreamedKth, kth_smallest

    numel = math.prod(shape)
    cols = numel // shape[0]
    ks = [max(1, int(d * numel)) if d < 1 else None for d in densities]
    sel = {i: StreamedKth(numel, numel - k + 1) for i, k in enumerate(ks) if k is not None}
    if not sel:
        return [None] * len(densities)

    def magnitudes(rows: Rows) -> dict[int, torch.Tensor]:
        b = load_base(rows)
        return {i: load(i, rows).sub_(b).abs_() for i in sel}

    samples: dict[int, list[torch.Tensor]] = {i: [] for i in sel}
    step = blocks[0][1] - blocks[0][0]
    for r0, r1 in _sample_rows(shape[0], cols):
        for rows in ((s, min(r1, s + step)) for s in range(r0, r1, step)):  # at most a block at a time
            for i, a in magnitudes(rows).items():
                samples[i].append(a.reshape(-1))
    for i, s in samples.items():
        sel[i].bracket(torch.cat(s))
    del samples
    for blk in blocks:
        for i, a in magnitudes(blk).items():
            sel[i].scan(a)
    cuts: list[tuple[torch.Tensor, int] | None] = [None] * len(densities)
    for i, s in sel.items():
        k = ks[i]
        assert k is not None
        found = s.result()
        if found is None:  # the sample was not representative: exact whole-tensor selection
            a = load(i, None).sub_(load_base(None)).abs_().reshape(-1)
            lo = kth_smallest(a, numel - k + 1)
            n_eq, n_greater = int(torch.count_nonzero(a == lo)), int(torch.count_nonzero(a > lo))
            del a
        else:
            lo, n_eq, n_greater = found
        # k − n_greater of the n_eq entries equal to ``lo`` survive: those with the highest flat indices
        cuts[i] = (lo, n_eq - (k - n_greater))
    return cuts


def _trim_block(d: torch.Tensor, lo: torch.Tensor, drop: int) -> int:
    """Zero the entries of a row block of ``δ`` below the top-k threshold ``lo``, and the first
    ``drop`` entries equal to it (flat order, ties continuing from earlier blocks); returns how
    many tied entries later blocks must still drop. The same bits as ``δ·mask`` with the boolean
    mask of :func:`~safemerge.methods._tensor.rank_window_mask`, from float operations only:
    ``sgn(|δ| − lo)`` is exact (−1 / 0 / 1)."""
    a = d.abs()
    s = (a - lo).sign_()  # (0 for NaN too: NaN·1 and NaN·0 are both NaN)
    if drop:
        tied = (a == lo).view(-1)
        n_tied = int(torch.count_nonzero(tied))
        if n_tied <= drop:  # every tied entry of this block is dropped: keep |δ| > lo
            d.mul_(s.clamp_(min=0))
            return drop - n_tied
        first_kept = int(torch.nonzero(tied)[drop])
        keep = s.clone().clamp_(min=0)  # |δ| > lo
        keep.view(-1)[first_kept:] = s.view(-1)[first_kept:].add_(1).clamp_(max=1)  # |δ| ≥ lo from there on
        d.mul_(keep)
        return 0
    d.mul_(s.add_(1).clamp_(max=1))  # keep |δ| ≥ lo
    return 0


def _sample_rows(n_rows: int, cols: int, target: int = 1 << 18, chunks: int = 64) -> list[Rows]:
    """About ``target`` entries as ``chunks`` row ranges spread evenly over the tensor."""
    per = max(1, -(-target // (chunks * cols)))
    if per * chunks >= n_rows:
        return [(0, n_rows)]
    return [(r0, r0 + per) for r0 in (c * (n_rows - per) // (chunks - 1) for c in range(chunks))]


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
