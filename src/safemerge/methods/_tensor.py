"""Small tensor helpers shared by the merge methods (no I/O, no configs).

Everything here works on float32 and allocates at most a couple of tensor-sized temporaries.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from safemerge.errors import ConfigError

_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def f32(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` as float32 (no copy when it already is)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def check_inputs(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    base_policy: str,
    min_models: int,
    max_models: int | None,
) -> None:
    """Validate the number of inputs and their shapes; raise :class:`ConfigError` on misuse."""
    n = len(tensors)
    if base_policy == "required" and base is None:
        raise ConfigError(f"merge method {method!r} needs a base model", "set base_model: in the config")
    if n < min_models or (max_models is not None and n > max_models):
        if max_models == min_models:
            want = f"exactly {min_models}"
        elif max_models is None:
            want = f"at least {min_models}"
        else:
            want = f"between {min_models} and {max_models}"
        what = "non-base models" if base_policy in ("required", "optional") else "input models (base included)"
        raise ConfigError(
            f"merge method {method!r} needs {want} {what}, got {n}",
            "list the right number of models under models: (the base_model is passed separately)"
            if base_policy in ("required", "optional")
            else "list the right number of models (a base_model is counted as one of the inputs)",
        )
    shapes = {tuple(t.shape) for t in tensors}
    if base is not None:
        shapes.add(tuple(base.shape))
    if len(shapes) > 1:
        raise ConfigError(
            f"merge method {method!r}: input tensors have different shapes {sorted(shapes)}",
            "merge models of the same architecture, or align vocabularies with tokenizer: first",
        )


def per_model_list(method: str, per_model: dict, name: str, n: int) -> list:
    """Fetch the per-model values of parameter ``name`` and check there is one per input."""
    values = per_model.get(name)
    if values is None:
        raise ConfigError(f"merge method {method!r}: missing required parameter {name!r}",
                          f"give every model a {name!r} under parameters:")
    values = list(values)
    if len(values) != n:
        raise ConfigError(
            f"merge method {method!r}: parameter {name!r} has {len(values)} values for {n} models",
            f"give each input model exactly one {name!r}",
        )
    if any(v is None for v in values):
        raise ConfigError(f"merge method {method!r}: missing required parameter {name!r} for some model",
                          f"give every model a {name!r} under parameters:")
    return values


def nonzero_weight_sum(method: str, weights: torch.Tensor, option: str) -> torch.Tensor:
    """Σᵢ wᵢ for weight normalisation; a zero sum is a :class:`ConfigError` (mergekit 0.1.5 divides and writes ±inf)."""
    total = weights.sum()
    if total == 0:
        raise ConfigError(
            f"{method}: the model weights sum to 0, so {option} would divide by zero",
            f"change the weights or set {option.split(':')[0]}: false",
        )
    return total


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest element (1-based) of a 1-D tensor, as a 0-d tensor — exactly.

    ``torch.kthvalue`` on a large tensor allocates a float copy plus an int64 index buffer
    (three tensor-sized buffers). For large inputs we first bracket the answer with the
    ``kthvalue`` of a strided sample (≈2¹⁸ elements), count the elements below and inside the
    bracket (boolean temporaries only), and select within the few candidates inside it. The
    bracket is verified by the counts, so the result is exact; if it misses (it should not,
    with a ±6σ margin) or values are NaN, we fall back to ``torch.kthvalue``.
    """

    n = flat.numel()
    if n < (1 << 15):
        return torch.kthvalue(flat, k).values
    # (NaN needs no special case: NaNs are neither below nor inside the bracket, so a bracket
    # that does not account for the k-th element fails the count check and falls back)
    step = max(1, n // min(1 << 18, max(1 << 12, n // 32)))
    sample = flat[::step]
    m = sample.numel()
    q = (k - 0.5) / n
    d = 6.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
    r_lo = min(m, max(1, int(math.floor((q - d) * m))))
    r_hi = min(m, max(1, int(math.ceil((q + d) * m))))
    lo_v = torch.kthvalue(sample, r_lo).values if q - d > 0 else flat.min()
    hi_v = torch.kthvalue(sample, r_hi).values if q + d < 1 else flat.max()
    below = int(torch.count_nonzero(flat < lo_v))
    inside = (flat >= lo_v) & (flat <= hi_v)
    if below < k <= below + int(torch.count_nonzero(inside)):
        return torch.kthvalue(flat[inside], k - below).values
    return torch.kthvalue(flat, k).values


class StreamedKth:
    """The ``k``-th smallest (1-based) of ``numel`` values seen block by block — exactly, with
    memory for a sample and the candidates near the answer, never the whole tensor.

    The same bracketing as :func:`kth_smallest`, split into passes over the data: feed a sample
    (any subset, e.g. a few spread-out row ranges) to :meth:`bracket`, then every block to
    :meth:`scan`, which counts the values below / above the bracket and keeps those inside it.
    :meth:`result` selects the answer among the candidates
    and returns ``None`` when the counts show the bracket missed it (or values were NaN); the
    caller then falls back to a whole-tensor selection. :meth:`ties_per_block` then says how many
    entries of each scanned block equal the answer (the candidates keep the blocks' flat order), so
    that a second pass over the same blocks knows where the tied entries are without searching
    for them. Used by TIES top-k trimming (Yadav et al. 2023, Sec. 3 "Trim") on tensors processed
    in row blocks.
    """

    def __init__(self, numel: int, k: int) -> None:
        self.numel, self.k = int(numel), int(k)
        self.lo_v = self.hi_v = None
        self.below = self.above = 0
        self.candidates = torch.empty(0)
        self.n_in = 0
        self.block_ends: list[int] = []  # candidates collected after each scanned block
        self.block_sizes: list[int] = []
        self._masks: tuple[np.ndarray, np.ndarray] | None = None

    def bracket(self, sample: torch.Tensor) -> None:
        """Bounds that contain the answer with overwhelming probability (±8σ of the sample quantile), and
        room for the candidates the sample predicts inside them."""

        sample = sample.reshape(-1)
        m = sample.numel()
        q = (self.k - 0.5) / self.numel
        d = 8.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
        r_lo = min(m, max(1, int(math.floor((q - d) * m))))
        r_hi = min(m, max(1, int(math.ceil((q + d) * m))))
        inf = torch.tensor(float("inf"), dtype=sample.dtype, device=sample.device)
        lo_v, hi_v = order_statistics(sample, [r_lo, r_hi])
        self.lo_v = lo_v if q - d > 0 else -inf
        self.hi_v = hi_v if q + d < 1 else inf
        inside = int(torch.count_nonzero((sample >= self.lo_v).logical_and_(sample <= self.hi_v)))
        self.candidates = torch.empty(inside * self.numel // max(m, 1) * 5 // 4 + 4096, dtype=sample.dtype,
                                      device=sample.device)

    def scan(self, block: torch.Tensor) -> None:
        """Count / collect the next block (blocks must come in flat order). Comparisons only, so the
        counts are exact; a NaN is neither below nor above the bracket and lands among the candidates,
        where :meth:`result` finds it and reports failure. The candidates go into one buffer sized from
        the sample (grown when needed): small per-block arrays kept between the blocks' temporaries
        fragment the heap (measured: +0.8× the tensor's float32 size of peak RSS for a 3-model TIES
        tensor)."""
        flat = block.reshape(-1)
        x = _numpy_view(flat)
        if x is None:
            self.below += int(torch.count_nonzero(flat < self.lo_v))
            self.above += int(torch.count_nonzero(flat > self.hi_v))
            inside = flat[(flat >= self.lo_v).logical_and_(flat <= self.hi_v)]
            self._room(inside.numel())[:] = inside
        else:
            # numpy's comparisons, counts and boolean selection are vectorised; torch's CPU kernels for
            # them are not (measured on a 128 Ki-entry float32 block: 0.6 ns vs 4.4 ns per entry). Two
            # comparisons into reused masks: inside = neither below nor above
            below, above = self._block_masks(x.size)
            np.less(x, self.lo_v.item(), out=below)  # (values of the block's dtype: exact as Python floats)
            np.greater(x, self.hi_v.item(), out=above)
            n_below, n_above = int(np.count_nonzero(below)), int(np.count_nonzero(above))
            self.below += n_below
            self.above += n_above
            inside = np.logical_or(below, above, out=below)
            np.logical_not(inside, out=inside)
            np.compress(inside, x, out=self._room(x.size - n_below - n_above).numpy())
        self.block_ends.append(self.n_in)
        self.block_sizes.append(flat.numel())

    def scan_delta(self, model: torch.Tensor, base: torch.Tensor) -> None:
        """:meth:`scan` of the block ``|model − base|``, on the CPU fused into one loop that never holds the
        magnitudes (:func:`safemerge.methods._fused.scan_magnitudes`; float32 blocks, or both in bfloat16,
        widened inside the loop); the same counts and candidates."""
        from safemerge.methods._fused import kernel_array, scan_magnitudes

        x, b = kernel_array(model), kernel_array(base)
        if x is None or b is None or x.dtype != b.dtype or self.candidates.dtype != torch.float32:
            self.scan((model.float() - base.float()).abs_())
            return
        self._reserve(b.size)
        below, above, self.n_in = scan_magnitudes(x, b, np.float32(self.lo_v.item()), np.float32(self.hi_v.item()),
                                                  self.candidates.numpy(), self.n_in)
        self.below += below
        self.above += above
        self.block_ends.append(self.n_in)
        self.block_sizes.append(b.size)

    def _block_masks(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Two boolean scratch arrays of ``size`` entries, reused from block to block."""
        if self._masks is None or self._masks[0].size < size:
            self._masks = (np.empty(size, dtype=bool), np.empty(size, dtype=bool))
        return self._masks[0][:size], self._masks[1][:size]

    def _reserve(self, count: int) -> None:
        """Room for ``count`` more candidates (the buffer doubled when full)."""
        if self.n_in + count > self.candidates.numel():
            grown = torch.empty(max(2 * self.candidates.numel(), self.n_in + count), dtype=self.candidates.dtype,
                                device=self.candidates.device)
            grown[: self.n_in] = self.candidates[: self.n_in]
            self.candidates = grown

    def _room(self, count: int) -> torch.Tensor:
        """The next ``count`` free entries of the candidate buffer."""
        self._reserve(count)
        self.n_in += count
        return self.candidates[self.n_in - count : self.n_in]

    def result(self) -> tuple[torch.Tensor, int, int] | None:
        """``(k-th value, number of entries equal to it, number of entries greater than it)``,
        or ``None`` when the bracket missed (or there were NaNs)."""
        values, n_in = self.candidates[: self.n_in], self.n_in
        if self.below + n_in + self.above != self.numel or not self.below < self.k <= self.below + n_in:
            return None  # (NaNs are not counted: the counts fall short)
        if bool(torch.isnan(values).any()):
            return None
        below, above = self.below, self.above
        (kth,) = order_statistics(values, [self.k - below])
        return kth, int(torch.count_nonzero(values == kth)), above + int(torch.count_nonzero(values > kth))

    def ties_per_block(self, value: torch.Tensor) -> tuple[int, ...]:
        """How many entries of each scanned block (in order) equal ``value``, a value inside the
        bracket (such as :meth:`result`'s): counted among the candidates, which keep the flat order."""
        equal = torch.zeros(self.n_in + 1, dtype=torch.int64)
        torch.cumsum(self.candidates[: self.n_in] == value, dim=0, out=equal[1:])
        ends = equal[torch.tensor(self.block_ends, dtype=torch.int64)]
        return tuple(torch.diff(ends, prepend=equal[:1]).tolist())


def order_statistics(values: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """The ``k``-th smallest (1-based) entries of ``values`` for every ``k`` in ``ks`` — the values
    ``torch.kthvalue`` gives, as 0-d tensors of ``values``' dtype. On the CPU one ``numpy.partition``
    for all of them (introselect: 1.5 ms against ``kthvalue``'s 2.5 ms per 2¹⁸ entries, measured);
    the value of an order statistic does not depend on the algorithm that selects it (NaN-free
    values: callers check NaN themselves)."""
    flat = values.reshape(-1)
    x = _numpy_view(flat)
    if x is None:
        return [torch.kthvalue(flat, k).values for k in ks]
    picked = np.partition(x, [k - 1 for k in ks])
    return [torch.tensor(picked[k - 1], dtype=values.dtype, device=values.device) for k in ks]


def _numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """``t`` as a numpy array sharing its memory (CPU, contiguous, a numpy float dtype), else ``None``."""
    if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS and t.is_contiguous():
        return t.numpy()
    return None


def at_least(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The boolean mask ``a ≥ v`` (``False`` at NaN). On the CPU with numpy's vectorised comparison
    (torch's CPU comparison kernels cost 3× more per entry)."""
    x = _numpy_view(a)
    return a >= v if x is None else torch.from_numpy(x >= v.item())


def above(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The boolean mask ``a > v`` (``False`` at NaN), with numpy's comparison on the CPU as :func:`at_least`."""
    x = _numpy_view(a)
    return a > v if x is None else torch.from_numpy(x > v.item())


def flat_indices_equal(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The flat indices (ascending, int64) of the entries of ``a`` equal to ``v``."""
    x = _numpy_view(a)
    if x is None:
        return torch.nonzero(a.reshape(-1) == v).squeeze(1)
    return torch.from_numpy(np.flatnonzero(x == v.item()))


def multiply_by_mask(d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``d ⊙ keep`` in place for a boolean ``keep``: ``d·1.0`` where kept, ``d·0.0`` (a zero with the sign of
    ``d``; NaN stays NaN) elsewhere — the bits of multiplying by a float 0/1 mask. numpy's mixed-dtype
    multiply is vectorised, torch's is not (0.18 vs 0.68 ns per entry)."""
    x, m = _numpy_view(d), keep.numpy() if keep.device.type == "cpu" else None
    if x is None or m is None:
        return d.mul_(keep)
    with np.errstate(invalid="ignore"):  # NaN·0 is NaN, as in torch, without numpy's warning
        np.multiply(x, m.reshape(x.shape), out=x)
    return d


def sample_rows(n_rows: int, cols: int, target: int = 1 << 18, chunks: int = 64) -> list[tuple[int, int]]:
    """About ``target`` entries as ``chunks`` row ranges spread evenly over a tensor of ``n_rows``
    rows of ``cols`` entries (all rows when that is fewer): the sample that brackets a
    :class:`StreamedKth`."""
    per = max(1, -(-target // (chunks * cols)))
    if per * chunks >= n_rows:
        return [(0, n_rows)]
    return [(r0, r0 + per) for r0 in (c * (n_rows - per) // (chunks - 1) for c in range(chunks))]


def streamed_order_statistics(values: Callable[[tuple[int, int]], torch.Tensor], ks: Sequence[int],
                              shape: Sequence[int], blocks: Sequence[tuple[int, int]]) -> list[torch.Tensor] | None:
    """The ``k``-th smallest (1-based) entries, for every ``k`` in ``ks``, of a tensor of ``shape`` that
    ``values(rows)`` computes row block by row block — exactly (the values ``kthvalue`` of the whole
    tensor gives), bracketed from a row sample. ``None`` when a bracket missed or there were NaNs."""

    numel = math.prod(shape)
    selections = [StreamedKth(numel, k) for k in ks]
    sample = torch.cat([values(rows).reshape(-1) for rows in sample_rows(shape[0], numel // shape[0])])
    for sel in selections:
        sel.bracket(sample)
    del sample
    for rows in blocks:
        block = values(rows)
        for sel in selections:
            sel.scan(block)
    found = [sel.result() for sel in selections]
    return None if any(f is None for f in found) else [f[0] for f in found]  # type: ignore[index]


def rank_window_mask(values: torch.Tensor, start: int, count: int,
                     tie_select: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """Boolean mask of the elements whose ascending rank lies in ``[start, start + count)``.

    Ranks come from a stable ascending sort of the flattened tensor (ties are ordered by flat
    index), so the mask always has exactly ``count`` true entries and is deterministic. Instead of
    a full ``argsort`` this uses two ``torch.kthvalue`` selections (O(n)) and only enumerates
    the elements tied with the two boundary values.

    Used by TIES top-k trimming (Yadav et al. 2023, Sec. 3 "Trim"), Model Breadcrumbs
    (Davari & Belilovsky 2024, Sec. 3) and SCE's variance selection (Wan et al. 2024).

    ``tie_select`` (optional) decides the case where a group of exactly equal values straddles a
    window boundary, so that *which* of the tied entries survive is a matter of convention: it
    receives the flattened values and returns the selected flat indices. The merge methods pass
    the selection rule mergekit uses (a full sort) in ``mergekit`` tie-break mode
    (:data:`~safemerge.methods.blocks.TIE_BREAKS`) and ``None`` otherwise, when ties are ordered by flat index.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    start = max(0, int(start))
    count = min(int(count), n - start)
    if count <= 0 or n == 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if start == 0 and count == n:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if start + count == n:  # top-``count`` (TIES, SCE): one threshold, ties only at the bottom
        lo = kth_smallest(flat, start + 1)
        mask = flat > lo
        need = count - int(torch.count_nonzero(mask))  # entries equal to ``lo`` that survive (≥ 1)
        eq = flat == lo
        n_eq = int(torch.count_nonzero(eq))
        if need == n_eq:
            return mask.logical_or_(eq).reshape(values.shape)
        if tie_select is not None:
            sel = torch.zeros(n, dtype=torch.bool, device=flat.device)
            sel[tie_select(flat)] = True
            return sel.reshape(values.shape)
        tied = torch.nonzero(eq).squeeze(1)  # ascending flat index = ascending rank among ties
        mask[tied[n_eq - need :]] = True
        return mask.reshape(values.shape)
    # min/max are much cheaper than a selection; top-k (end == n) needs only one kthvalue
    lo = flat.min() if start == 0 else kth_smallest(flat, start + 1)
    hi = flat.max() if start + count == n else kth_smallest(flat, start + count)
    mask = (flat > lo) & (flat < hi)
    end = start + count
    if tie_select is not None:
        for v in (lo, hi):
            n_below = int(torch.count_nonzero(flat < v))
            n_tied = int(torch.count_nonzero(flat == v))
            if n_tied > 1 and (n_below < start < n_below + n_tied or n_below < end < n_below + n_tied):
                sel = torch.zeros(n, dtype=torch.bool, device=flat.device)
                sel[tie_select(flat)] = True
                return sel.reshape(values.shape)
    for v in (lo, hi) if not torch.equal(lo, hi) else (lo,):
        tied = torch.nonzero(flat == v).squeeze(1)
        first_rank = int(torch.count_nonzero(flat < v))
        ranks = torch.arange(first_rank, first_rank + tied.numel(), device=flat.device)
        mask[tied[(ranks >= start) & (ranks < end)]] = True
    return mask.reshape(values.shape)


def masked_rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7, *,
                    inplace: bool = False) -> torch.Tensor:
    """Zero the entries where ``mask`` is 0/False; optionally restore the original L1 norm.

    DARE (Yu et al. 2024, Eq. 2) rescales survivors by ``1/p``; mergekit — and we — instead
    rescale the masked tensor to the *exact* L1 norm of the unmasked one,
    ``m ⊙ δ · ‖δ‖₁ / ‖m ⊙ δ‖₁``, which equals ``1/p`` in expectation. No rescaling when either
    norm is below ``eps``.
    """
    if inplace and mask.dtype == torch.bool:  # the caller owns ``tensor``: no extra full-size buffer
        before = tensor.abs().sum() if rescale else None
        masked = tensor.mul_(mask)  # (4× faster than masked_fill_(~mask, 0); zeros may be −0.0)
        if not rescale:
            return masked
    else:
        if mask.dtype == torch.bool:
            masked = torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
        else:
            masked = tensor * mask
        if not rescale:
            return masked
        before = tensor.abs().sum()
    factor = l1_rescale_factor(before, masked.abs().sum(), eps)
    return masked if factor is None else masked.mul_(factor)


def l1_rescale_factor(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """``‖δ‖₁ / ‖m ⊙ δ‖₁`` from the two float32 norms (0-d tensors) — the factor
    :func:`masked_rescaled` multiplies the survivors by — or ``None`` (no rescaling) when either
    norm is below ``eps``. The row-block kernels apply the same factor block by block."""
    if before < eps or after < eps:
        return None
    return before / after


_GATHER_BITS = 0x0102040810204080
"""Multiplying a 64-bit word of eight 0/1 bytes by this moves byte k's bit to bit 56 + k (no carries)."""
_SPREAD_BYTE = 0x0101010101010101
"""Multiplying a byte by this copies it into all eight bytes of a 64-bit word."""
_BIT_K_OF_BYTE_K = 0x8040201008040201 - (1 << 64)
"""Bit k of byte k of a 64-bit word (as a signed 64-bit constant)."""


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask (any dtype, any shape) packed eight entries per byte, in flat order (uint8,
    ``⌈numel/8⌉`` bytes: one 32nd of a float32 mask). Undone by :func:`unpack_mask`; the row-block
    kernels keep the random masks of pass 1 this way instead of drawing them again."""
    flat = mask.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return flat.view(torch.int64).mul_(_GATHER_BITS).bitwise_right_shift_(56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask :func:`pack_mask` packed, as 0.0/1.0 entries of ``like``'s shape, dtype and device."""
    spread = packed.to(torch.int64).mul_(_SPREAD_BYTE).bitwise_and_(_BIT_K_OF_BYTE_K)
    return spread.view(torch.uint8)[: like.numel()].to(like.dtype).clamp_(max=1).view(like.shape)


_DOT_CHUNK = 1 << 16


def dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ over all elements, accumulated in float64 chunk by chunk (0-d float64 tensor).

    A float32 BLAS dot over millions of elements is off by ~1e-6 relative, which ``acos`` in
    SLERP / Karcher amplifies for nearly parallel weights; float64 accumulation makes the angle
    exact to float32 precision while the temporaries stay at one 64 Ki-element chunk.
    """
    af, bf = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, af.numel(), _DOT_CHUNK):
        total += torch.dot(af[i : i + _DOT_CHUNK].to(torch.float64), bf[i : i + _DOT_CHUNK].to(torch.float64))
    return total


class ChunkedDots:
    """Several :func:`dot64` sums over tensors fed block by block, bit-identical to
    :func:`dot64` on the whole tensors: the same 65,536-entry chunks of the flattened tensors
    (a chunk split across two blocks is completed from a carried tail), each converted to
    float64 and summed in the same order. ``pairs`` index the operands of :meth:`add`, e.g.
    ``[(0, 0), (1, 1), (0, 1)]`` for ‖a‖², ‖b‖², ⟨a, b⟩.
    """

    def __init__(self, pairs: Sequence[tuple[int, int]]) -> None:
        self.pairs = list(pairs)
        self.totals = [torch.zeros((), dtype=torch.float64) for _ in self.pairs]
        self.carry: list[torch.Tensor] | None = None

    def add(self, operands: Sequence[torch.Tensor]) -> None:
        """The next block of every operand (same shape, flat order continuing the previous one)."""
        flats = [o.reshape(-1) for o in operands]
        if self.carry is not None:
            flats = [torch.cat([c, f]) for c, f in zip(self.carry, flats)]
        n = flats[0].numel()
        full = n - n % _DOT_CHUNK
        for i in range(0, full, _DOT_CHUNK):
            self._chunk([f[i : i + _DOT_CHUNK] for f in flats])
        self.carry = [f[full:].clone() for f in flats] if full < n else None

    def finish(self) -> list[torch.Tensor]:
        """The float64 sums (0-d tensors), in the order of ``pairs``."""
        if self.carry is not None:
            self._chunk(self.carry)
            self.carry = None
        return self.totals

    def _chunk(self, chunks: list[torch.Tensor]) -> None:
        for k, (p, q) in enumerate(self.pairs):
            self.totals[k] += torch.dot(chunks[p].to(torch.float64), chunks[q].to(torch.float64))


def norm64(a: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over all elements, accumulated in float64 (0-d float64 tensor)."""
    return dot64(a, a).sqrt()
