"""Fused row-block kernels of the task-arithmetic family (numba): each row block in cache-sized chunks.

The eager PyTorch path of :mod:`safemerge.methods.task_arithmetic_two_pass` runs a few dozen whole-block
operations per row block (subtract, magnitude, two comparisons, mask, weight, the TIES election sum,
copysign, clamp, sign, the disjoint sums, divide, add the base), each one a pass over the 2 MiB block in
memory. At 1.2B parameters that kernel, not the I/O, was the merge's time (issue 16: 44.5 of 65.9 s on one
thread). Here the same operations run **in the eager path's order and in float32** over chunks of
:data:`CHUNK` entries that stay in the CPU's cache, as loops the compiler vectorises (comparisons become
selects, not branches: a mispredicted branch per entry cost more than all the arithmetic), so the bits
are the same: a dropped entry is ``δ·0`` (−δ gives −0), ``clamp_(min=0)`` is ``maximum(x, 0)`` (NaN stays;
the sign of a zero it returns cannot reach the sum, which starts at +0), ``sign`` of NaN is 0, ``copysign``
reads the sign bit; NaN and ±inf appear where the eager path has them (a NaN's payload bits are the
compiler's choice). Divisions follow IEEE (``error_model="numpy"``: numba's default zero check stops
vectorisation) and loops index slices from 0 (an offset index of unknown sign is wrapped around entry by
entry). Compiled once per number of models and input dtype and cached on disk (``cache=True``); the kernels
release the GIL, so the executor's worker threads run them in parallel.

Model modes (:data:`KEEP`, :data:`ZERO`, :data:`WINDOW`, :data:`EMPTY`) are those of
``task_arithmetic_two_pass._ModelSparsifier`` without random masks: untouched, ``density ≤ 0``, a rank
window of ``|δ|`` between two cuts (TIES' top-k: Yadav et al. 2023, Sec. 3 "Trim"; Model Breadcrumbs:
Davari & Belilovsky 2024, Sec. 3), an empty window.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

KEEP, ZERO, WINDOW, EMPTY = 0, 1, 2, 3
CHUNK = 1024
"""Entries per chunk: the chunk's float32 scratch rows (one per model and a few more) stay in the L1/L2 cache."""

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


def kernel_array(t: torch.Tensor) -> np.ndarray | None:
    """A contiguous CPU tensor as the flat array the kernels take: float32 as is, bfloat16 as its ``uint16``
    bits (:func:`as_float32`); ``None`` for anything else."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.bfloat16):
        return None
    flat = t.reshape(-1)
    return flat.numpy() if t.dtype == torch.float32 else flat.view(torch.int16).numpy().view(np.uint16)


def as_float32(x: np.ndarray, start: int, size: int, scratch: np.ndarray) -> np.ndarray:
    """Entries ``[start, start + size)`` of a flat input as float32: a view of a float32 array, or a bfloat16
    array (stored as ``uint16`` bits) widened into ``scratch`` — exactly, a bfloat16 is the upper half of
    the float32 with the same value. Reading bfloat16 rows straight from the checkpoint moves half the bytes
    through memory that widening them to float32 blocks first did (the merge is bound by that traffic
    when two workers run)."""
    raise NotImplementedError("compiled only: see the overload below")


@overload(as_float32, jit_options={"nogil": True, "error_model": "numpy"})
def _as_float32_impl(x, start, size, scratch):  # noqa: ANN001, ANN202
    if isinstance(x.dtype, types.Integer):  # bfloat16 bits
        def widen(x, start, size, scratch):  # noqa: ANN001, ANN202
            part, bits = x[start : start + size], scratch.view(np.uint32)
            for k in range(size):  # (a product, not a shift: numba's shift checks its count, which stops LLVM
                bits[k] = np.uint32(part[k]) * np.uint32(65536)  # from vectorising the loop)
            return scratch[:size]
        return widen

    def view(x, start, size, scratch):  # noqa: ANN001, ANN202
        return x[start : start + size]
    return view


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _at_or_above(a: np.ndarray, cut: np.float32, left: int, flag: np.ndarray) -> int:
    """``flag[k] = aₖ ≥ cut`` for a chunk of magnitudes ``a`` (``False`` at NaN), the first ``left`` entries
    equal to the cut (flat order, continuing from earlier chunks and blocks) ranking below it. Returns the
    tied entries later chunks must still drop."""
    for k in range(a.size):
        flag[k] = a[k] >= cut
    if left > 0:
        for k in range(a.size):
            if a[k] == cut:
                flag[k] = False
                left -= 1
                if left == 0:
                    break
    return left


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _weighted_window(x: np.ndarray, b: np.ndarray, d: np.ndarray, lo: np.float32 | None, hi: np.float32 | None,
                     scale: np.float32, w: np.float32) -> None:
    """``d = ((δ·keep)·scale)·w`` with ``δ = x − b`` and ``keep = |δ| ≥ lo and not |δ| ≥ hi`` (a cut that is
    ``None`` is no bound) — one loop, once no tied entries remain to drop at either cut (every block after
    the one where the ties at a cut run out). ``scale`` is 1 without L1 rescaling (``x·1 = x``)."""
    if hi is None:
        for k in range(d.size):
            t = x[k] - b[k]
            d[k] = ((t * np.float32(abs(t) >= lo)) * scale) * w
    elif lo is None:
        for k in range(d.size):
            t = x[k] - b[k]
            d[k] = ((t * np.float32(not abs(t) >= hi)) * scale) * w
    else:
        for k in range(d.size):
            t = x[k] - b[k]
            a = abs(t)
            d[k] = ((t * np.float32((a >= lo) > (a >= hi))) * scale) * w


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _mask_window_with_ties(d: np.ndarray, i: int, cuts: np.ndarray, has: np.ndarray, left: np.ndarray,
                           mag: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """``d = d·keep`` for model ``i``'s rank window while a cut still has tied entries to drop (``left``
    counted down in flat order); ``mag``, ``lo``, ``hi`` scratch."""
    for k in range(d.size):
        mag[k] = abs(d[k])
    if has[0, i]:
        left[0, i] = _at_or_above(mag, cuts[0, i], left[0, i], lo)
    else:
        lo[:] = True
    if has[1, i]:
        left[1, i] = _at_or_above(mag, cuts[1, i], left[1, i], hi)
    else:
        hi[:] = False
    for k in range(d.size):
        d[k] = d[k] * np.float32(lo[k] > hi[k])  # rank ≥ start and not ≥ end


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _weighted_sparse_delta(x: np.ndarray, b: np.ndarray, d: np.ndarray, i: int, mode: np.ndarray, cuts: np.ndarray,
                           has: np.ndarray, left: np.ndarray, scale: np.ndarray, has_scale: np.ndarray,
                           weight: np.ndarray, mag: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """``d = wᵢ·sparsify(x − b)`` for one chunk of model ``i``, ``_weighted_block_delta``'s operations:
    ``cuts[j, i]`` / ``has[j, i]`` / ``left[j, i]`` the window's lower (j = 0) and upper (j = 1) cut
    (``left`` updated); ``mag``, ``lo``, ``hi`` scratch."""
    m = mode[i]
    if m == WINDOW and left[0, i] == 0 and left[1, i] == 0 and (has[0, i] or has[1, i]):
        _weighted_window(x, b, d, cuts[0, i] if has[0, i] else None, cuts[1, i] if has[1, i] else None,
                         scale[i] if has_scale[i] else _F1, weight[i])
        return
    for k in range(d.size):
        d[k] = x[k] - b[k]
    if m == ZERO:
        d[:] = _F0
    elif m == EMPTY:
        for k in range(d.size):
            d[k] = d[k] * _F0
    elif m == WINDOW and (has[0, i] or has[1, i]):
        _mask_window_with_ties(d, i, cuts, has, left, mag, lo, hi)
    if m != KEEP and m != ZERO and has_scale[i]:
        s = scale[i]
        for k in range(d.size):
            d[k] = d[k] * s
    w = weight[i]
    for k in range(d.size):
        d[k] = d[k] * w


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _sum_rows(wd: np.ndarray, size: int, mixed: np.ndarray) -> None:
    """``mixed = ((wd₀ + wd₁) + wd₂) + …`` over the first ``size`` entries of each row."""
    first = wd[0, :size]
    for k in range(size):
        mixed[k] = first[k]
    for i in range(1, wd.shape[0]):
        row = wd[i, :size]
        for k in range(size):
            mixed[k] = mixed[k] + row[k]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _disjoint_merge(wd: np.ndarray, size: int, weight: np.ndarray, normalize: bool, mixed: np.ndarray,
                    sign: np.ndarray, divisor: np.ndarray) -> None:
    """TIES "Elect" + "Disjoint merge" (Yadav et al. 2023, Sec. 3) of a chunk's weighted task vectors (the
    rows of ``wd``, ``size`` entries) into ``mixed``, as ``task_arithmetic.disjoint_merge`` computes it:
    ``γ = copysign(1, Σᵢ wdᵢ + 0)``, the sum of ``max(wdᵢ·γ, 0)`` times γ, divided by the agreeing weights
    (1 where none agree) when ``normalize``."""
    _sum_rows(wd, size, mixed)
    for k in range(size):
        sign[k] = np.copysign(_F1, mixed[k] + _F0)
        mixed[k] = _F0
        divisor[k] = _F0
    for i in range(wd.shape[0]):
        row = wd[i, :size]
        w = weight[i]
        for k in range(size):
            c = np.maximum(row[k] * sign[k], _F0)
            divisor[k] = divisor[k] + w * np.float32(c > _F0)  # + wᵢ·sign(c), c ≥ 0 or NaN
            mixed[k] = mixed[k] + c
    for k in range(size):
        mixed[k] = mixed[k] * sign[k]
    if normalize:
        for k in range(size):
            mixed[k] = mixed[k] / (divisor[k] + np.float32(divisor[k] == _F0))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def merge_block(models: tuple, base: np.ndarray, out: np.ndarray, mode: np.ndarray, cuts: np.ndarray,
                has: np.ndarray, left: np.ndarray, scale: np.ndarray, has_scale: np.ndarray, weight: np.ndarray,
                consensus: bool, normalize: bool, weight_sum: np.float32, lam: np.float32, use_lam: bool) -> None:
    """``out = θ_base + λ·merge(wᵢ·sparsify(δᵢ))`` for one flat float32 row block, chunk by chunk.

    ``models`` are the blocks of the inputs, ``base`` the base's (all flat, float32 or all bfloat16 bits:
    :func:`as_float32`); per model ``i``:
    ``mode[i]``, the window's cuts ``cuts[j, i]`` (``has[j, i]``; ``left[j, i]`` the tied entries each
    cut still drops, updated for the next block), the L1 factor ``scale[i]`` (``has_scale``) and the
    weight. ``consensus``: TIES' sign election and disjoint mean (normalised by the agreeing weights when
    ``normalize``); without it the weighted sum, divided by ``weight_sum`` when ``normalize``. ``lam``
    multiplies the merge when ``use_lam``. Mirrors ``_weighted_block_delta`` and
    ``task_arithmetic.merge_weighted_deltas`` operation by operation."""
    n = len(models)
    wd = np.empty((n, CHUNK), dtype=np.float32)
    mixed_, sign_, divisor_ = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32)
    lo_, hi_ = np.empty(CHUNK, np.bool_), np.empty(CHUNK, np.bool_)
    xs, bs = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32)
    for c0 in range(0, base.size, CHUNK):
        size = min(base.size, c0 + CHUNK) - c0
        b = as_float32(base, c0, size, bs)
        mixed, sign, divisor = mixed_[:size], sign_[:size], divisor_[:size]
        for i in range(n):
            _weighted_sparse_delta(as_float32(models[i], c0, size, xs), b, wd[i, :size], i, mode, cuts, has, left,
                                   scale, has_scale, weight, divisor, lo_[:size], hi_[:size])
        if consensus:
            _disjoint_merge(wd, size, weight, normalize, mixed, sign, divisor)
        else:
            _sum_rows(wd, size, mixed)
            if normalize:
                for k in range(size):
                    mixed[k] = mixed[k] / weight_sum
        if use_lam:
            for k in range(size):
                mixed[k] = mixed[k] * lam
        o = out[c0 : c0 + size]
        for k in range(size):
            o[k] = mixed[k] + b[k]


SUB = 32
"""Entries per step of :func:`scan_magnitudes`: counted with vectorised comparisons, and looked at one by one
only when some fall inside the bracket (a few percent of the steps)."""


@numba.njit(nogil=True, cache=True, error_model="numpy")
def scan_magnitudes(model: np.ndarray, base: np.ndarray, lo: np.float32, hi: np.float32, candidates: np.ndarray,
                    n_in: int) -> tuple[int, int, int]:
    """One block of a :class:`~safemerge.methods._tensor.StreamedKth` scan of ``|θ − θ_base|`` without the
    magnitudes in memory (float32 or bfloat16 bits: :func:`as_float32`): count the entries below
    ``lo`` and above ``hi`` and append those inside ``[lo, hi]`` to ``candidates`` after its first
    ``n_in`` (room for the whole block needed). Returns ``(below, above, n_in)``. A NaN is counted
    nowhere, so the counts fall short and :meth:`~safemerge.methods._tensor.StreamedKth.result` reports
    failure, as it does for the NaN the eager scan keeps among the candidates."""
    below = 0
    above = 0
    xs, bs = np.empty(CHUNK, np.float32), np.empty(CHUNK, np.float32)
    for c0 in range(0, base.size, CHUNK):
        size = min(base.size, c0 + CHUNK) - c0
        x, b = as_float32(model, c0, size, xs), as_float32(base, c0, size, bs)
        for s0 in range(0, size, SUB):
            xs_, bs_ = x[s0 : s0 + SUB], b[s0 : s0 + SUB]  # (slices: an index ``s0 + j`` of unknown sign would
            lt = 0                                         # make numba wrap it around, entry by entry)
            gt = 0
            for j in range(xs_.size):
                a = abs(xs_[j] - bs_[j])
                lt += a < lo
                gt += a > hi
            below += lt
            above += gt
            if lt + gt < xs_.size:
                for j in range(xs_.size):  # branch-free: store every entry, advance past those inside
                    a = abs(xs_[j] - bs_[j])
                    candidates[n_in] = a
                    n_in += np.int64(a >= lo) & np.int64(a <= hi)
    return below, above, n_in
