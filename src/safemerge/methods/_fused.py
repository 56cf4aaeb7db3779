"""Fused row-block kernels of the task-arithmetic family (numba): one pass over memory per block.

The eager PyTorch path of :mod:`safemerge.methods.task_arithmetic_two_pass` runs a few dozen whole-block
operations per row block (subtract, magnitude, two comparisons, mask, weight, the TIES election sum,
copysign, clamp, sign, the disjoint sums, divide, add the base), each one a pass over the block in memory.
At 1.2B parameters that kernel, not the I/O, was the merge's time (issue 16: 44.5 of 65.9 s on one thread).
Here every output entry is computed in one loop iteration from the same entry of the inputs, with the
operations of the eager path **in its order and in float32**, so the bits are the same — including
signed zeros and NaN: ``max(x, 0)`` of ``clamp_`` keeps NaN and −0, ``sign`` of NaN is 0, a dropped entry
is ``δ·0`` (NaN stays NaN, −δ gives −0), ``copysign`` reads the sign bit. Compiled once per number of
models and cached on disk (``cache=True``); the kernels release the GIL, so the executor's worker threads
run them in parallel.

Model modes (:data:`KEEP`, :data:`ZERO`, :data:`WINDOW`, :data:`EMPTY`) are those of
``task_arithmetic_two_pass._ModelSparsifier`` without random masks: untouched, ``density ≤ 0``, a rank
window of ``|δ|`` between two cuts (TIES' top-k: Yadav et al. 2023, Sec. 3 "Trim"; Model Breadcrumbs:
Davari & Belilovsky 2024, Sec. 3), an empty window.
"""
from __future__ import annotations

import math

import numba
import numpy as np

KEEP, ZERO, WINDOW, EMPTY = 0, 1, 2, 3

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


@numba.njit(nogil=True, cache=True, inline="always")
def _at_or_above(a: np.float32, cut: np.float32, left: np.ndarray, i: int) -> bool:
    """``|δ|`` at or above a cut, the first ``left[i]`` entries equal to the cut (flat order, counted down
    across blocks) ranking below it; ``False`` at NaN."""
    if a > cut:
        return True
    if a == cut:
        if left[i] > 0:
            left[i] -= 1
            return False
        return True
    return False


@numba.njit(nogil=True, cache=True)
def merge_block(models: tuple, base: np.ndarray, out: np.ndarray, mode: np.ndarray,
                cut_lo: np.ndarray, has_lo: np.ndarray, left_lo: np.ndarray,
                cut_hi: np.ndarray, has_hi: np.ndarray, left_hi: np.ndarray,
                scale: np.ndarray, has_scale: np.ndarray, weight: np.ndarray,
                consensus: bool, normalize: bool, weight_sum: np.float32, lam: np.float32, use_lam: bool) -> None:
    """``out = θ_base + λ·merge(wᵢ·sparsify(δᵢ))`` for one flat float32 row block.

    ``models`` are the blocks of the inputs, ``base`` the base's (all flat float32); per model ``i``:
    ``mode[i]``, the window's cuts (``cut_lo`` / ``cut_hi`` with ``has_*``; ``left_*[i]`` the tied entries
    each cut still drops, updated for the next block), the L1 factor ``scale[i]`` (``has_scale``) and the
    weight. ``consensus``: TIES' sign election and disjoint mean (normalised by the agreeing weights when
    ``normalize``); without it the weighted sum, divided by ``weight_sum`` when ``normalize``. ``lam``
    multiplies the merge when ``use_lam``. Mirrors ``_weighted_block_delta`` and
    ``task_arithmetic.merge_weighted_deltas`` / ``disjoint_merge`` operation by operation."""
    n = len(models)
    wd = np.empty(n, dtype=np.float32)
    for j in range(base.size):
        b = base[j]
        for i in range(n):
            d = models[i][j] - b
            m = mode[i]
            if m == ZERO:
                d = _F0
            elif m == EMPTY:
                d = d * _F0
            elif m == WINDOW:
                a = abs(d)
                keep = True
                if has_lo[i]:
                    keep = _at_or_above(a, cut_lo[i], left_lo, i)
                if has_hi[i]:  # (counted down whatever the lower cut decided, as the eager masks are)
                    above_hi = _at_or_above(a, cut_hi[i], left_hi, i)
                    keep = keep and not above_hi
                if has_lo[i] or has_hi[i]:
                    d = d * (_F1 if keep else _F0)
            if m != KEEP and m != ZERO and has_scale[i]:
                d = d * scale[i]
            wd[i] = d * weight[i]
        mixed = wd[0]
        for i in range(1, n):
            mixed = mixed + wd[i]
        if consensus:
            sign = np.float32(math.copysign(1.0, mixed + _F0))
            mixed = _F0
            divisor = _F0
            for i in range(n):
                x = wd[i] * sign
                c = _F0 if x < _F0 else x  # clamp_(min=0): NaN and −0 stay
                if normalize:  # + wᵢ·sign(c): c ≥ 0, −0 or NaN, whose sign is 1 or 0
                    divisor = divisor + weight[i] * (_F1 if c > _F0 else _F0)
                mixed = mixed + c
            mixed = mixed * sign
            if normalize:
                divisor = divisor + (_F1 if divisor == _F0 else _F0)
                mixed = mixed / divisor
        elif normalize:
            mixed = mixed / weight_sum
        if use_lam:
            mixed = mixed * lam
        out[j] = mixed + b


@numba.njit(nogil=True, cache=True)
def scan_magnitudes(model: np.ndarray, base: np.ndarray, lo: np.float32, hi: np.float32, candidates: np.ndarray,
                    n_in: int, start: int) -> tuple[int, int, int, int]:
    """One block of a :class:`~safemerge.methods._tensor.StreamedKth` scan of ``|θ − θ_base|`` without
    the magnitudes in memory: from flat entry ``start`` on, count the entries below ``lo`` and above ``hi``
    and append the others (NaN included) to ``candidates`` after its first ``n_in``. Returns
    ``(below, above, n_in, stop)``; ``stop < base.size`` when ``candidates`` is full (grow it, call again
    from ``stop``)."""
    below = 0
    above = 0
    cap = candidates.size
    for j in range(start, base.size):
        a = abs(model[j] - base[j])
        if a < lo:
            below += 1
        elif a > hi:
            above += 1
        else:
            if n_in == cap:
                return below, above, n_in, j
            candidates[n_in] = a
            n_in += 1
    return below, above, n_in, base.size
