"""Opening a model reference — a directory, a ``.safetensors`` file, a Hub id, or ``MODEL+ADAPTER``.

Its own module because it joins the two readers: :mod:`.checkpoint` (safetensors/pickle models)
and :mod:`.adapter` (PEFT adapters, which read their tensors with :class:`~.checkpoint.Checkpoint`).
"""
from __future__ import annotations

from pathlib import Path

from safemerge.io.adapter import AdaptedCheckpoint, load_adapter
from safemerge.io.checkpoint import Checkpoint
from safemerge.io.hub import split_model_ref
from safemerge.options import RunOptions

OpenedModel = Checkpoint | AdaptedCheckpoint
"""What :func:`open_checkpoint` returns: a model's tensors, read lazily (with an adapter applied on read)."""
ModelRef = str | Path
"""A model reference as the user gives it: a directory, a ``.safetensors`` file, a Hub id or ``MODEL+ADAPTER``."""


def open_checkpoint(ref: ModelRef, *, options: RunOptions | None = None) -> OpenedModel:
    """Open a model reference: a directory, a ``.safetensors`` file, a Hub id, or ``MODEL+ADAPTER``.

    ``MODEL+ADAPTER`` (mergekit syntax) returns an :class:`~safemerge.io.adapter.AdaptedCheckpoint`
    that adds the LoRA update to each target weight as it is read, one tensor at a time. ``options``:
    pickles and NaN/Inf allowed or not (both sides).
    """
    base, adapter = split_model_ref(str(ref))
    ckpt = Checkpoint(base, options=options)
    if adapter is None:
        return ckpt
    return AdaptedCheckpoint(ckpt, load_adapter(adapter, options=options))
