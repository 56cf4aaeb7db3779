"""The one per-tensor seed of every stochastic method (DARE, DELLA, RESTA's DARE, SafeMERGE's dense strategies).

A tensor's random draws depend only on ``(seed, tensor name)``, never on the processing order
or the number of worker threads, so outputs are byte-identical per seed for any ``-j``; and the
same method with the same seed draws the same masks whichever command runs it (``safemerge
merge`` with ``merge_method: resta`` or ``safemerge resta``).
"""
from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int | None, name: str) -> int:
    """A 63-bit seed derived from the run seed (``None`` = 0) and the tensor name (blake2b)."""
    h = hashlib.blake2b(f"{0 if seed is None else int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def tensor_generator(seed: int | None, name: str, device: str = "cpu") -> torch.Generator:
    """A torch RNG seeded with :func:`tensor_seed` (``name`` is the output tensor's name)."""
    return torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
