"""Plans over one model's tensors: every full-model output of the safety commands runs on the engine.

``safemerge merge`` plans from a mergekit config (:mod:`.plan`). The safety commands know their
inputs already — RESTA's three models, MergeAlign's three, SafeLoRA's and SafeMERGE's target
model plus a per-layer update — so they build the same :class:`~safemerge.engine.plan.MergePlan`
directly: one :class:`~safemerge.engine.plan.TensorJob` per tensor of a *reference* model, in that
model's file order, with that model's storage dtypes (or ``dtype``). :func:`write_plan` then runs
it with :func:`~safemerge.engine.run.execute_plan` — threads, row blocks, NaN/Inf checks on inputs
and outputs, per-tensor seeds — into a streaming shard writer. One executor for every output.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from safemerge.engine.plan import MergePlan, TensorJob
from safemerge.engine.run import execute_plan
from safemerge.errors import CheckpointError, ConfigError
from safemerge.io.output import ShardWriter
from safemerge.methods.registry import MergeMethod
from safemerge.options import RunOptions

TensorUpdate = Callable[[str, torch.Tensor], "torch.Tensor | None"]
"""``(tensor name, float32 tensor) → new float32 tensor``, or ``None`` to keep the tensor."""


def _floating(dtype_name: str) -> bool:
    return dtype_name.startswith(("float", "bfloat"))


class Float32Reads(Mapping):
    """A checkpoint whose floating tensors are read in float32 whatever ``dtype`` the engine asks for.

    The engine reads ``get(name, dtype=None)`` and widens; for a ``MODEL+ADAPTER`` that would round
    ``W + s·B·A`` to the model's storage dtype first. The safety methods compute on the exact
    float32 sum, as their papers' reference code does, so their plans read through this view.
    """

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.ckpt, attr)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name, dtype=None)

    def __contains__(self, name: object) -> bool:
        return name in self.ckpt

    def __iter__(self) -> Iterator[str]:
        return iter(self.ckpt)

    def __len__(self) -> int:
        return len(self.ckpt)

    def _dtype(self, name: str, dtype: Any) -> Any:
        return "float32" if dtype is None and _floating(self.ckpt.dtype_name(name)) else dtype

    def get(self, name: str, dtype: Any = "float32", device: str = "cpu") -> torch.Tensor:
        return self.ckpt.get(name, dtype=self._dtype(name, dtype), device=device)

    def get_rows(self, name: str, start: int, stop: int, dtype: Any = "float32") -> torch.Tensor:
        return self.ckpt.get_rows(name, start, stop, dtype=self._dtype(name, dtype))


def check_same_tensors(ref: Any, others: Sequence[tuple[str, Any]]) -> None:
    """Every tensor of ``ref`` exists with the same shape in each ``(role, checkpoint)`` of ``others``."""
    for n in ref.names():
        for role, ck in others:
            if n not in ck:
                raise CheckpointError(f"tensor {n!r} of {ref.path} is missing from the {role} model {ck.path}",
                                      "all models must share one architecture")
            if tuple(ck.shape(n)) != tuple(ref.shape(n)):
                raise CheckpointError(
                    f"tensor {n!r} has shape {tuple(ck.shape(n))} in the {role} model but {tuple(ref.shape(n))} "
                    f"in {ref.path}", "all models must share one architecture (same vocabulary size)")


def plan_tensorwise(method: MergeMethod, ckpts: Mapping[str, Any], *, reference: str, models: Sequence[str],
                    base: str | None, params: Mapping[str, Any], dtype: str | None = None) -> MergePlan:
    """A plan applying ``method`` to every tensor of ``ckpts[reference]``, named alike in every input.

    Args:
        method: the tensor function with its declared parameters (checked here, once).
        ckpts: model key → checkpoint; keys are what ``reference``, ``models`` and ``base`` name.
        models: the inputs in the method's order (``tensors``); ``base``: its base model, or ``None``.
        params: global parameter values; missing ones take their declared defaults.
        dtype: storage dtype of floating tensors (default: the reference's, tensor by tensor);
            non-floating tensors are copied from the reference unchanged.
    """
    if len(models) < method.min_models or (method.max_models is not None and len(models) > method.max_models):
        raise ConfigError(f"{method.name} takes {method.min_models}..{method.max_models} models, got {len(models)}",
                          "report this as a bug")
    checked = {p.name: p.check(params.get(p.name, p.default), f"{method.name}") for p in method.global_params}
    ref = ckpts[reference]
    others = [m for m in dict.fromkeys([*models, *([base] if base else [])]) if m != reference]
    check_same_tensors(ref, [(m, ckpts[m]) for m in others])
    jobs = []
    for name in ref.names():
        stored = ref.dtype_name(name)
        floating = _floating(stored)
        jobs.append(TensorJob(
            out_name=name,
            inputs=[(m, name) for m in models] if floating else [(reference, name)],
            base=(base, name) if base is not None and floating else None,
            per_model={}, params=checked, shape=tuple(ref.shape(name)),
            out_dtype=(dtype or stored) if floating else stored, passthrough=not floating,
        ))
    return MergePlan(config=None, method=method, jobs=jobs, reference=reference, num_layers=int(ref.num_layers),
                     compute_dtype=None)


def update_method(name: str, update: TensorUpdate, reference: str) -> MergeMethod:
    """A one-input method applying ``update`` to each tensor by name (SafeLoRA's/SafeMERGE's per-layer rule)."""

    def fn(tensors: list[torch.Tensor], base: torch.Tensor | None, *, per_model: dict, params: dict,
           generator: torch.Generator | None = None, name: str) -> torch.Tensor:
        new = update(name, tensors[0])
        return tensors[0] if new is None else new

    return MergeMethod(name=name, fn=fn, min_models=1, max_models=1, reference=reference,
                       extra={"needs_tensor_name": True})


def write_plan(tmp: Path, plan: MergePlan, ckpts: Mapping[str, Any], *, options: RunOptions | None = None,
               progress: Callable[[int, int], None] | None = None, max_shard_bytes: int = 5_000_000_000,
               metadata: Mapping[str, str] | None = None) -> None:
    """Run ``plan`` on the engine (``options``: threads, seed, device, NaN/Inf, the engine's progress
    bar), streaming every tensor into safetensors shards in ``tmp``.

    ``progress(done, total)`` is called as tensors are written (the safety API's callback).
    """
    writer = ShardWriter(tmp, max_shard_bytes=max_shard_bytes, plan=[(j.out_name, j.shape) for j in plan.jobs],
                         plan_dtypes={j.out_name: j.out_dtype for j in plan.jobs}, metadata=metadata)
    lock, done = threading.Lock(), [0]

    def sink(job: TensorJob, t: torch.Tensor | None) -> None:
        if t is not None:  # (None: streamed into the shard row block by row block)
            writer.add(job.out_name, t)
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], len(plan.jobs))

    execute_plan(plan, ckpts, sink, options=options, narrow=True,
                 write_rows=lambda job, rows, block: writer.add_rows(job.out_name, rows, block))
    writer.finish()
