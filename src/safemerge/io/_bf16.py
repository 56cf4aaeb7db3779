"""A compiled finiteness test for bfloat16 tensors (numba): the one check every bfloat16 row block passes.

torch sums a bfloat16 tensor (:func:`safemerge.io.checkpoint.all_finite`'s usual test) without vectorising
the widening on CPUs without native bfloat16: 1.29 ns per entry on a 2-core AMD EPYC (AVX2), a seventh of a
1.2B merge's single-thread time once the merge kernels read bfloat16 rows directly. A bfloat16 is NaN or
±Inf exactly when its eight exponent bits are all ones, so the largest magnitude's bits tell: 0.25 ns per
entry, measured on the same machine.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

_EXPONENT = np.uint16(0x7F80)
_MAGNITUDE = np.uint16(0x7FFF)


@numba.njit(nogil=True, cache=True)
def _largest_magnitude_bits(bits: np.ndarray) -> np.uint16:
    largest = np.uint16(0)
    for k in range(bits.size):
        largest = max(largest, bits[k] & _MAGNITUDE)
    return largest


def bf16_all_finite(t: torch.Tensor) -> bool:
    """True when the contiguous CPU bfloat16 tensor ``t`` holds no NaN/Inf."""
    bits = t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    return bool(_largest_magnitude_bits(bits) < _EXPONENT)
