"""Full-model outputs of the safety commands, as engine plans.

RESTA and MergeAlign are registered tensor methods (:mod:`safemerge.methods.safety`) applied to
every tensor of three models; SafeLoRA and SafeMERGE write a target model plus a per-layer update
(:func:`~safemerge.engine.tensorwise.update_method`). Either way the output is one
:class:`~safemerge.engine.plan.MergePlan` run by the engine (:func:`~safemerge.engine.tensorwise.write_plan`),
followed by the model's config, generation config and tokenizer files.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safemerge.engine.plan import MergePlan
from safemerge.engine.tensorwise import Float32Reads, TensorUpdate, plan_tensorwise, update_method, write_plan
from safemerge.errors import CheckpointError
from safemerge.io.references import open_checkpoint
from safemerge.io.hub import resolve_local, split_model_ref
from safemerge.io.output import copy_model_files


def open_ref(ref: Any, *, on: Any = None, allow_pickle: bool, allow_nonfinite: bool, role: str) -> Any:
    """A model dir, ``MODEL+ADAPTER``, or an adapter dir applied to ``on`` (a model path)."""
    if split_model_ref(str(ref))[1] is not None:
        return open_checkpoint(str(ref), allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    p = resolve_local(str(ref), allow_pickle=allow_pickle)  # a Hub id becomes its local snapshot
    if (p / "adapter_config.json").exists():
        if on is None:
            raise CheckpointError(f"--{role} {ref} is an adapter", "pass MODEL+ADAPTER")
        return open_checkpoint(f"{on}+{p}", allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    if not p.exists():
        raise CheckpointError(f"--{role} path {str(ref)!r} does not exist", "check the path")
    return open_checkpoint(str(p), allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)


SAFETY_JOBS = 1
"""Worker threads of the safety commands' full-model writes: one, so that memory holds one tensor's inputs
at a time (the commands have no ``-j`` yet; the bits do not depend on it)."""


def write_model(tmp: Path, plan: MergePlan, ckpts: Mapping[str, Any], *, seed: int | None = 0,
                allow_nonfinite: bool = False, progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``plan`` into ``tmp`` (float32 reads, see :class:`Float32Reads`) and copy the reference model's files."""
    write_plan(tmp, plan, {k: Float32Reads(c) for k, c in ckpts.items()}, seed=seed, jobs=SAFETY_JOBS,
               allow_nonfinite=allow_nonfinite, progress=progress)
    src = Path(ckpts[plan.reference].path)
    copy_model_files(src if src.is_dir() else src.parent, tmp)


def write_updated_model(tmp: Path, model: Any, update: TensorUpdate, *, method: str, dtype: str | None,
                        allow_nonfinite: bool = False, progress: Callable[[int, int], None] | None = None) -> None:
    """Every tensor of ``model`` into ``tmp``, replaced by ``update(name, tensor)`` where that is not ``None``."""
    plan = plan_tensorwise(update_method(method, update, reference=method), {"model": model}, reference="model",
                           models=["model"], base=None, params={}, dtype=dtype)
    write_model(tmp, plan, {"model": model}, allow_nonfinite=allow_nonfinite, progress=progress)
