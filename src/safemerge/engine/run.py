"""Execution: read → merge → write one output tensor at a time on a small thread pool.

Reading (memory-mapped), computing (float32) and writing (``pwrite`` at planned offsets)
overlap across ``options.threads`` worker threads; at most ``2·threads`` tensors are in flight, so peak
memory is a few tensors regardless of model size. Stochastic methods get a generator seeded
from ``(seed, tensor name)``, and torch's intra-op parallelism is pinned to one thread while
merging, so outputs are byte-identical for any number of threads.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from safemerge.config import load_config
from safemerge.engine.plan import MergePlan, TensorJob, plan_merge
from safemerge.errors import SafemergeError
from safemerge.io.checkpoint import all_finite, require_finite
from safemerge.io.hub import prefetch_metadata
from safemerge.io.references import open_checkpoint
from safemerge.methods.blocks import InputTensors, Rows, TwoPassJob, row_blocks
from safemerge.methods.mergekit_order import KERNELS
from safemerge.methods.seeding import tensor_generator
from safemerge.methods.streaming import TWO_PASS
from safemerge.options import RunOptions, or_default
from safemerge.progress import progress_bar

_ALLOCATOR_TUNED = False


def tune_allocator(mmap_threshold: int | None = None, trim_threshold: int = 32 << 20) -> bool:
    """Serve allocations ≥ ``mmap_threshold`` with mmap so freed tensors go back to the OS, and
    keep up to ``trim_threshold`` of freed smaller ones for reuse.

    glibc's default *dynamic* threshold grows to 32 MB after large frees, after which
    tensor-sized buffers are carved from per-thread arenas and retained; with a fixed threshold
    peak RSS follows the tensors actually alive (measured on the SmolLM2 TIES benchmark with a
    1 MB threshold: 1.55 GB → 1.18 GB with -j 2). The threshold (default: twice the row block,
    :data:`ELEMENTWISE_BLOCK_BYTES`) sits above the blocks, so a block's float32 temporaries come from the heap and are
    reused rather than mapped and page-faulted in for every block. Setting it also freezes the
    trim threshold at 128 KB, so those temporaries would be handed back to the OS after every
    block (measured: 3–10× the cost of the arithmetic on them); a 32 MB trim threshold keeps
    them. No-op on other C libraries.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes
        import ctypes.util

        if mmap_threshold is None:
            mmap_threshold = 2 * ELEMENTWISE_BLOCK_BYTES
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold)))
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_trim_threshold, int(trim_threshold))) and _ALLOCATOR_TUNED
    except (OSError, AttributeError):
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


@contextmanager
def single_intraop_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


ELEMENTWISE_BLOCK_BYTES = 2 << 20
"""Methods that stream process tensors larger than this (in float32) in row blocks of about this
size: below the allocator's mmap threshold (:func:`tune_allocator`), so a block's temporaries are
reused instead of page-faulted in — fresh tensor-sized buffers cost more than the arithmetic done
in them — yet large enough that the Python between torch's operations (which holds the GIL) is
small against the operations themselves (which release it), so two worker threads run in parallel.
Measured on the 1.2B bf16 scale benchmark (2-core AMD EPYC, AVX2, ``-j 2``): 512 KiB blocks →
TIES 43–49 s, linear 10.6 s (two threads barely faster than one: GIL hand-offs); 2 MiB → 26–28 s
and 7.2 s; 4–6 MiB no better (the blocks no longer fit the CPU's caches)."""



def _load(ckpts: Mapping[str, Any], ref: str, name: str, compute_dtype: str | None, options: RunOptions,
          rows: Rows | None = None, keep_dtype: bool = False, check: bool = True, as_stored: bool = False):
    """Read one input tensor (or rows of it) onto ``options.device``, refusing NaN/Inf unless
    ``options.allow_nonfinite`` (or ``check`` is off: these rows were checked when first read): rounded to
    ``compute_dtype`` (the config's ``dtype``), then widened
    to float32 — or, with ``keep_dtype`` (mergekit arithmetic), left in that dtype. Row blocks of safetensors
    checkpoints are converted straight from the mapped file
    into a small float32 buffer (one pass, no intermediate copy) — or, with ``as_stored`` (rows on the CPU
    whose stored dtype the compute dtype does not round: :func:`_stored_bf16`), read into a buffer of the
    stored dtype, unconverted."""

    ckpt, device = ckpts[ref], options.device
    fused = rows is not None and not keep_dtype and device == "cpu" and hasattr(ckpt, "copy_rows")
    if fused:
        t = _load_rows(ckpt, name, rows, compute_dtype, as_stored)  # type: ignore[arg-type]
    else:
        t = ckpt.get(name, dtype=None) if rows is None else ckpt.get_rows(name, rows[0], rows[1], dtype=None)
    if t.is_floating_point():
        if not fused:
            if compute_dtype is not None:
                t = t.to(getattr(torch, compute_dtype))
            t = t.to(device=device, dtype=None if keep_dtype else torch.float32)
        if check and not options.allow_nonfinite:
            require_finite(t, name, ref)
    return t


def _load_rows(ckpt: Any, name: str, rows: Rows, compute_dtype: str | None, as_stored: bool = False):
    """Rows of a floating-point tensor as float32, rounded to ``compute_dtype`` as the
    whole-tensor path rounds them (with ``as_stored``: in the stored dtype, unrounded); other tensors as
    stored."""

    stored = ckpt.dtype_name(name)
    shape = ckpt.shape(name)
    if not getattr(torch, stored, torch.int64).is_floating_point:
        return ckpt.get_rows(name, rows[0], rows[1], dtype=None)
    dtype = getattr(torch, stored) if as_stored else torch.float32
    t = ckpt.copy_rows(name, rows[0], rows[1], torch.empty((rows[1] - rows[0], *shape[1:]), dtype=dtype))
    if not as_stored and compute_dtype not in (None, "float32", stored):
        t.copy_(t.to(getattr(torch, compute_dtype)))  # stored → compute rounding, as the whole-tensor path
    return t


def _row_blocks(job: TensorJob, plan: MergePlan, ckpts: Mapping[str, Any]) -> list[Rows] | None:
    """Row blocks for a tensor the executor may stream, or ``None`` (whole tensor)."""

    refs = [r for r, _ in job.inputs] + ([job.base[0]] if job.base is not None else [])
    if (
        plan.mergekit_arithmetic
        or job.vocab is not None
        or len(job.shape) < 2
        or math.prod(job.shape) * 4 <= ELEMENTWISE_BLOCK_BYTES
        or not all(hasattr(ckpts[r], "get_rows") for r in refs)
    ):
        return None
    return row_blocks(job.shape, ELEMENTWISE_BLOCK_BYTES)


RowWriter = Callable[[TensorJob, Rows, Any], None]
"""``write_rows(job, rows, block)``: stores rows ``[r0, r1)`` of a job's output, already in its output
dtype, at their final place (``ShardWriter.add_rows``)."""


def run_job(job: TensorJob, plan: MergePlan, ckpts: Mapping[str, Any], *, options: RunOptions, narrow: bool = False,
            write_rows: RowWriter | None = None):
    """Compute one output tensor (float32 on ``options.device``, or with ``narrow`` in the job's output
    dtype, converted block by block; non-float tensors pass through). With ``write_rows`` (and
    ``narrow``) a tensor merged in row blocks is never assembled: each block goes to ``write_rows``
    in the output dtype as soon as it is merged — no tensor-sized output buffer to allocate and
    fault in, each block written while it is in the cache — and the result is ``None``."""

    if job.passthrough:
        ref, name = job.base or job.inputs[0]
        return ckpts[ref].get(name, dtype=None)
    out_dtype = getattr(torch, job.out_dtype) if narrow and job.out_dtype else torch.float32
    blocks = _row_blocks(job, plan, ckpts)
    if blocks is not None:
        if write_rows is not None and narrow:
            out, store = None, lambda rows, part: write_rows(job, rows, _narrow(part, out_dtype))
        else:
            out = torch.empty(job.shape, dtype=out_dtype, device=options.device)
            store = partial(_narrow_into, out)
        if _run_streamed(job, plan, ckpts, blocks, options, store):
            return out
    out = _run_block(job, plan, ckpts, options, None)
    _check_output(plan, job, out, options.allow_nonfinite)
    if narrow and out.is_floating_point() and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out


def _check_output(plan: MergePlan, job: TensorJob, out: Any, allow_nonfinite: bool, rows: Rows | None = None) -> None:
    """The method's result (or row block of it) has the planned shape and, unless allowed, no NaN/Inf."""
    shape = tuple(job.shape) if rows is None else (rows[1] - rows[0], *job.shape[1:])
    if out is None:
        raise SafemergeError(f"{plan.method.name} produced no output for tensor {job.out_name}", "check the config")
    if tuple(out.shape) != shape:
        raise SafemergeError(f"{plan.method.name} produced shape {tuple(out.shape)} for {job.out_name}, expected "
                             f"{shape}", "report this as a bug")
    if not allow_nonfinite and out.is_floating_point() and not all_finite(out):
        raise SafemergeError(f"the merge produced NaN/Inf in tensor {job.out_name}",
                             "check weights/densities (e.g. normalisation by a zero weight sum)")


def _run_streamed(job: TensorJob, plan: MergePlan, ckpts: Mapping[str, Any], blocks: list[Rows], options: RunOptions,
                  store: Callable[[Rows, Any], None]) -> bool:
    """One tensor in row blocks, each merged float32 block checked and handed to ``store(rows, block)``
    as soon as it is merged: element-wise methods block by block, methods with a ``two_pass`` kernel
    (the TIES family: thresholds, generator states, L1 norms first) through it. ``False`` (nothing
    stored) when the method cannot stream this tensor."""

    def emit(rows: Rows, part: Any) -> None:
        _check_output(plan, job, part, options.allow_nonfinite, rows)
        store(rows, part)

    two_pass = TWO_PASS.get(plan.method.name)
    if two_pass is not None and plan.tie_break != "index" and plan.method.extra.get("tie_break"):
        return False  # mergekit's tie choice needs the whole-tensor sort
    if two_pass is not None and job.base is not None:
        return bool(two_pass(_two_pass_job(job, plan, ckpts, options, emit)))
    if not plan.method.extra.get("elementwise"):
        return False
    # each output entry depends only on the same entry of the inputs
    for rows in blocks:
        emit(rows, _run_block(job, plan, ckpts, options, rows))
    return True


def _two_pass_job(job: TensorJob, plan: MergePlan, ckpts: Mapping[str, Any], options: RunOptions,
                  emit: Callable[[Rows, Any], None]) -> TwoPassJob:
    """The :class:`TwoPassJob` of one tensor: row loaders (float32, and as stored bfloat16 where
    :func:`_stored_bf16`) that check each row block for NaN/Inf the first time any pass reads it."""
    checked: set[tuple[str, str, Rows | None]] = set()  # a kernel's later passes read the same rows again

    def first_read(ref: str, name: str, rows: Rows | None) -> bool:
        new = (ref, name, rows) not in checked
        checked.add((ref, name, rows))
        return new

    def load_f32(ref: str, name: str, rows: Rows | None):  # noqa: ANN202
        return _load(ckpts, ref, name, plan.compute_dtype, options, rows, check=first_read(ref, name, rows))

    def load_stored(ref: str, name: str, rows: Rows | None):  # noqa: ANN202
        return _load(ckpts, ref, name, plan.compute_dtype, options, rows, check=first_read(ref, name, rows),
                     as_stored=True)

    base = job.base
    assert base is not None
    stored = _stored_bf16(job, plan, ckpts, options)
    gen = tensor_generator(options.seed, job.out_name, options.device) if plan.method.stochastic else None
    return TwoPassJob(lambda i, rows: load_f32(*job.inputs[i], rows), lambda rows: load_f32(*base, rows),
                      len(job.inputs), tuple(job.shape), job.per_model, job.params, ELEMENTWISE_BLOCK_BYTES, emit,
                      generator=gen,
                      load_bf16=(lambda i, rows: load_stored(*job.inputs[i], rows)) if stored else None,
                      load_base_bf16=(lambda rows: load_stored(*base, rows)) if stored else None)


def _stored_bf16(job: TensorJob, plan: MergePlan, ckpts: Mapping[str, Any], options: RunOptions) -> bool:
    """Whether a row-block kernel may read this job's rows as stored bfloat16 (``TwoPassJob.load_bf16``):
    on the CPU, every input and the base stored in bfloat16 in a checkpoint that copies rows, and the
    config's ``dtype`` rounding nothing (unset, bfloat16 or float32, which holds every bfloat16 exactly)."""
    refs = [*job.inputs, *([job.base] if job.base is not None else [])]
    return (options.device == "cpu" and plan.compute_dtype in (None, "bfloat16", "float32")
            and all(hasattr(ckpts[ref], "copy_rows") and ckpts[ref].dtype_name(name) == "bfloat16"
                    for ref, name in refs))


def _narrow_into(out: Any, rows: Rows, part: Any) -> None:
    """Store a merged float32 block into rows ``[r0, r1)`` of the output (converted to its dtype)."""
    out[rows[0] : rows[1]] = part


def _narrow(part: Any, dtype: Any) -> Any:
    """A merged float32 block in the output ``dtype`` (rounded as :func:`_narrow_into` rounds it)."""
    return part.to(dtype)


def _run_block(job: TensorJob, plan: MergePlan, ckpts: Mapping[str, Any], options: RunOptions,
               rows: tuple[int, int] | None):

    def load(ref: str, name: str):  # noqa: ANN202
        return _load(ckpts, ref, name, plan.compute_dtype, options, rows, plan.mergekit_arithmetic)

    tensors = InputTensors(load(r, n) for r, n in job.inputs)
    base = None
    if job.base is not None:
        in_inputs = next((i for i, rn in enumerate(job.inputs) if rn == job.base), None)
        base = tensors[in_inputs] if in_inputs is not None else load(*job.base)
    if job.vocab is not None:
        tensors, base = _align_vocabulary(job, tensors, base)
    gen = None
    if plan.method.stochastic:
        gen = tensor_generator(options.seed, job.out_name, options.device)
    try:
        named = _named_arguments(plan, job)
        if plan.mergekit_arithmetic:
            return _mergekit_arithmetic(plan, job, tensors, base, gen, named)
        return plan.method.fn(tensors, base, per_model=job.per_model, params=job.params, generator=gen, **named)
    except SafemergeError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise SafemergeError(f"{plan.method.name} failed on tensor {job.out_name}: {' '.join(str(exc).split())[:200]}",
                             "check the method's parameters") from exc


def _named_arguments(plan: MergePlan, job: TensorJob) -> dict[str, str]:
    """The keyword arguments a method declares it needs: the tensor name, the plan's tie-break rule."""
    named = {"name": job.out_name} if plan.method.extra.get("needs_tensor_name") else {}
    if plan.method.extra.get("tie_break"):
        named["tie_break"] = plan.tie_break
    return named


def _align_vocabulary(job: TensorJob, tensors: list, base):  # noqa: ANN001, ANN202
    """Re-index the rows of an embedding / ``lm_head`` job's inputs to the output vocabulary."""

    loaded = {ref: t for (ref, _), t in zip(job.inputs, tensors)}
    if job.base is not None:
        loaded[job.base[0]] = base
    aligned = job.vocab.align(job.vocab_models, loaded)
    return InputTensors(aligned[r] for r, _ in job.inputs), (aligned[job.base[0]] if job.base is not None else None)


def _mergekit_arithmetic(plan: MergePlan, job: TensorJob, tensors: list, base, gen,  # noqa: ANN001, ANN202
                         named: dict | None = None):
    """One tensor as mergekit computes it: inputs promoted to one dtype (the config's ``dtype``
    when set), the method's mergekit-order kernel in that dtype — or, for methods mergekit runs
    in float32 internally, the float32 kernel rounded back to that dtype. ``named``: the keyword
    arguments the method declares (:func:`_named_arguments`)."""

    floats = [t for t in [*tensors, base] if t is not None and t.is_floating_point()]
    dtype = floats[0].dtype
    for t in floats[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    tensors = type(tensors)(t.to(dtype) for t in tensors)
    base = base.to(dtype) if base is not None else None
    kernel = KERNELS.get(plan.method.name)
    if kernel is not None:
        return kernel(tensors, base, per_model=job.per_model, params=job.params, generator=gen)
    wide = type(tensors)(t.float() for t in tensors)
    base = base.float() if base is not None else None
    out = plan.method.fn(wide, base, per_model=job.per_model, params=job.params, generator=gen, **(named or {}))
    return out.to(dtype)


def execute_plan(
    plan: MergePlan,
    ckpts: Mapping[str, Any],
    sink: Callable[[TensorJob, Any], None],
    *,
    options: RunOptions | None = None,
    description: str = "merging",
    narrow: bool = False,
    write_rows: RowWriter | None = None,
) -> None:
    """Run every job of ``plan`` and hand each result to ``sink(job, tensor)`` (called from worker threads).

    ``options``: ``threads`` workers (default one per CPU), ``seed`` of stochastic methods, ``device``,
    ``allow_nonfinite``, ``progress`` (a bar on stderr).

    The tensors are float32, or with ``narrow`` already in each job's ``out_dtype`` (converted
    block by block as they are merged: a writer then stores them without another pass). With
    ``write_rows`` as well, tensors merged in row blocks go to it block by block instead
    (:func:`run_job`) and ``sink`` gets ``None`` for them: the job is done, its rows are stored."""
    options = or_default(options)
    n_workers = max(1, int(options.threads or os.cpu_count() or 1))
    tune_allocator()
    total_bytes = plan.total_bytes

    with single_intraop_thread(), progress_bar(description, total=len(plan.jobs), total_bytes=total_bytes,
                                                  enabled=options.progress) as bar:

        def work(job: TensorJob) -> None:
            out = run_job(job, plan, ckpts, options=options, narrow=narrow, write_rows=write_rows)
            sink(job, out)
            bar.advance(job)

        if n_workers == 1:
            for job in plan.jobs:
                work(job)
            return
        pending: set[Future] = set()
        # largest tensors first (sinks are order-independent with several workers): the long
        # jobs overlap each other instead of leaving workers idle behind the last one (lm_head)
        it = iter(sorted(plan.jobs, key=lambda j: -math.prod(j.shape)))
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="safemerge") as pool:
            try:
                for job in it:
                    if len(pending) >= 2 * n_workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            f.result()
                    pending.add(pool.submit(work, job))
                done, _ = wait(pending)
                for f in done:
                    f.result()
            except BaseException:
                for f in pending:
                    f.cancel()
                raise


IN_MEMORY = RunOptions(threads=1, progress=False)
"""The defaults of :func:`merge_in_memory`: one thread and no bar (it runs inside optimisation loops)."""


def open_all(config: Any, *, options: RunOptions | None = None,
             checkpoints: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Open every model referenced by ``config`` (reusing ``checkpoints`` where given; pickles only
    with ``options.allow_pickle``).

    Hub ids are checked for existence (config files only) before any of them downloads weights,
    and every safetensors header is validated as its model opens, before the plan reads a tensor.
    """

    refs = [r for r in config.referenced_models() if checkpoints is None or r not in checkpoints]
    prefetch_metadata(refs)
    out: dict[str, Any] = {}
    for ref in config.referenced_models():
        if checkpoints is not None and ref in checkpoints:
            out[ref] = checkpoints[ref]
        else:
            # the engine checks every input itself after casting (_load), honouring --allow-nonfinite
            out[ref] = open_checkpoint(ref, options=or_default(options).replace(allow_nonfinite=True))
    return out


def merge_in_memory(
    config: Any,
    *,
    options: RunOptions | None = None,
    checkpoints: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a merge without touching disk; returns ``{name: float32 tensor}``.

    ``options``: default :data:`IN_MEMORY` (one thread, no progress bar: the optimizer calls this
    in a loop); ``seed``, ``device``, ``allow_pickle`` and ``allow_nonfinite`` as for a merge to disk.

    ``checkpoints`` maps model references to already-open (possibly in-RAM) mappings so that
    repeated merges (e.g. CMA-ES candidates) do not re-open files.
    """

    cfg = load_config(config)
    options = IN_MEMORY if options is None else options
    ckpts = open_all(cfg, options=options, checkpoints=checkpoints)
    plan = plan_merge(cfg, ckpts)
    result: dict[str, Any] = {}
    lock = threading.Lock()

    def sink(job: TensorJob, t: Any) -> None:
        with lock:
            result[job.out_name] = t

    execute_plan(plan, ckpts, sink, options=options)
    return {j.out_name: result[j.out_name] for j in plan.jobs}
