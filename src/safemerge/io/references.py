"""Opening a model reference — a directory, a ``.safetensors`` file, a Hub id, or ``MODEL+ADAPTER``.

Its own module because it joins the two readers: :mod:`.checkpoint` (safetensors/pickle models)
and :mod:`.adapter` (PEFT adapters, which read their tensors with :class:`~.checkpoint.Checkpoint`).
"""
from __future__ import annotations

from pathlib import Path

from safemerge.io.adapter import AdaptedCheckpoint, load_adapter
from safemerge.io.checkpoint import Checkpoint
from safemerge.io.hub import split_model_ref


def open_checkpoint(ref: str | Path, *, allow_pickle: bool = False, allow_nonfinite: bool = False):
    """Open a model reference: a directory, a ``.safetensors`` file, a Hub id, or ``MODEL+ADAPTER``.

    ``MODEL+ADAPTER`` (mergekit syntax) returns an :class:`~safemerge.io.adapter.AdaptedCheckpoint`
    that adds the LoRA update to each target weight as it is read, one tensor at a time.
    """
    base, adapter = split_model_ref(str(ref))
    ckpt = Checkpoint(base, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    if adapter is None:
        return ckpt
    return AdaptedCheckpoint(ckpt, load_adapter(adapter, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite))
