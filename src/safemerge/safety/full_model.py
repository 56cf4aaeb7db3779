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

from safemerge.engine.plan import MergePlan
from safemerge.engine.tensorwise import Float32Reads, TensorUpdate, plan_tensorwise, update_method, write_plan
from safemerge.errors import CheckpointError
from safemerge.io.hub import resolve_local, split_model_ref
from safemerge.io.output import copy_model_files
from safemerge.io.references import ModelRef, OpenedModel, open_checkpoint
from safemerge.options import RunOptions, or_default


def open_ref(ref: ModelRef, *, on: ModelRef | None = None, options: RunOptions | None, role: str) -> OpenedModel:
    """A model dir, ``MODEL+ADAPTER``, or an adapter dir applied to ``on`` (a model path)."""
    if split_model_ref(str(ref))[1] is not None:
        return open_checkpoint(str(ref), options=options)
    p = resolve_local(str(ref), options=options)  # a Hub id becomes its local snapshot
    if (p / "adapter_config.json").exists():
        if on is None:
            raise CheckpointError(f"--{role} {ref} is an adapter", "pass MODEL+ADAPTER")
        return open_checkpoint(f"{on}+{p}", options=options)
    if not p.exists():
        raise CheckpointError(f"--{role} path {str(ref)!r} does not exist", "check the path")
    return open_checkpoint(str(p), options=options)


SAFETY_JOBS = 1
"""Worker threads of the safety commands' full-model writes: one, so that memory holds one tensor's inputs
at a time (the commands have no ``-j`` yet; the bits do not depend on it)."""


def write_model(tmp: Path, plan: MergePlan, ckpts: Mapping[str, OpenedModel], *, options: RunOptions | None = None,
                progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``plan`` into ``tmp`` (float32 reads, see :class:`Float32Reads`) and copy the reference model's files.

    ``options``: ``seed``, ``device`` and ``allow_nonfinite`` of the engine; it runs on :data:`SAFETY_JOBS`
    threads and reports through ``progress(done, total)`` (the safety API's callback), not its own bar."""
    engine = or_default(options).replace(threads=SAFETY_JOBS, progress=False)
    write_plan(tmp, plan, {k: Float32Reads(c) for k, c in ckpts.items()}, options=engine, progress=progress)
    src = Path(ckpts[plan.reference].path)
    copy_model_files(src if src.is_dir() else src.parent, tmp)


def write_updated_model(tmp: Path, model: OpenedModel, update: TensorUpdate, *, method: str,
                        options: RunOptions | None = None, progress: Callable[[int, int], None] | None = None) -> None:
    """Every tensor of ``model`` into ``tmp``, replaced by ``update(name, tensor)`` where that is not ``None``
    (stored in ``options.dtype``, default the model's)."""
    plan = plan_tensorwise(update_method(method, update, reference=method), {"model": model}, reference="model",
                           models=["model"], base=None, params={}, dtype=or_default(options).dtype)
    write_model(tmp, plan, {"model": model}, options=options, progress=progress)
