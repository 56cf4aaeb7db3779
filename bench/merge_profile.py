"""Where a merge spends its time, per phase and per tensor (issue 16).

Runs ``safemerge.api.merge`` in-process on a config with timers around the executor's phases:

- ``read``      copying a tensor's (or a row block's) bytes out of the checkpoint file (``Checkpoint._read_into``)
- ``convert``   widening inputs to float32 (``engine.run._load`` minus ``read`` and ``check``)
- ``check``     the NaN/Inf checks of inputs and outputs (``engine.run.all_finite``)
- ``kernel``    the method itself (``run_job`` minus its loads, checks and narrowing)
- ``narrow``    the float32 → output dtype conversion: of each row block (``engine.run._narrow`` /
                ``_narrow_into``), or of a whole tensor and its byte view (``ShardWriter.add`` minus ``write``)
- ``write``     ``pwrite`` of the output bytes
- ``idle``      worker-thread time not spent in any of the above while tensors are merged (waiting
                for the pool, the GIL, …)

The wall time outside the executor (opening checkpoints, planning, creating the output files,
copying the tokenizer, writing the model card; imports happen before the clock starts) is
reported separately as ``setup``.

Times are exclusive (a phase nested inside another is subtracted from it) and summed over
worker threads, so with ``-j 2`` the phases add up to about 2 × wall. With ``--cpu`` every timer is the
thread's CPU time (``time.thread_time``) instead of wall time: on a machine shared with other jobs a
thread's wall time includes the time it waited for a core, its CPU time does not (``idle`` is then the
CPU time of the executor's process not spent in any phase — the main thread, the pool's bookkeeping; waits
for the pool and the GIL cost no CPU time and are not counted at all — and the shares are of that CPU time).

    .venv/bin/python bench/merge_profile.py CONFIG.yml [-j 2] [--cpu] [--top 10] [--json out.json]

Not a test; timings on a loaded machine are indicative.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from safemerge.options import RunOptions

PHASES = ("read", "convert", "check", "kernel", "narrow", "write", "idle")


class Profiler:
    """Exclusive per-phase timers, per thread, attributed to the tensor being merged."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.local = threading.local()
        self.lock = threading.Lock()
        self.totals: dict[str, float] = defaultdict(float)
        self.per_tensor: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.executor_wall = 0.0
        self.executor_cpu = 0.0

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self.local.__dict__.setdefault("stack", [])
            stack.append(0.0)  # time spent in nested timed calls
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = self.clock() - t0
                nested = stack.pop()
                if stack:
                    stack[-1] += dt
                self.add(phase, dt - nested)

        return timed

    def add(self, phase: str, seconds: float) -> None:
        tensor = getattr(self.local, "tensor", "?")
        with self.lock:
            self.totals[phase] += seconds
            self.per_tensor[tensor][phase] += seconds


def instrument(prof: Profiler) -> None:
    """Patch the executor's phases with ``prof``'s timers (this process only)."""
    import safemerge.engine.run as run
    import safemerge.engine.tensorwise as tensorwise
    import safemerge.io.output as output
    from safemerge.io.checkpoint import Checkpoint

    Checkpoint._read_into = prof.wrap(Checkpoint._read_into, "read")
    run._load = prof.wrap(run._load, "convert")
    run.all_finite = prof.wrap(run.all_finite, "check")
    run._narrow_into = prof.wrap(run._narrow_into, "narrow")
    run._narrow = prof.wrap(run._narrow, "narrow")
    inner = run.run_job

    def run_job(job: Any, *args: Any, **kwargs: Any) -> Any:
        prof.local.tensor = job.out_name
        return inner(job, *args, **kwargs)

    run.run_job = prof.wrap(run_job, "kernel")
    execute = run.execute_plan

    def execute_plan(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return execute(*args, **kwargs)
        finally:
            prof.executor_wall = time.perf_counter() - t0
            prof.executor_cpu = time.process_time() - c0

    run.execute_plan = tensorwise.execute_plan = execute_plan  # (write_plan calls it by its own name)
    output.ShardWriter.add = prof.wrap(output.ShardWriter.add, "narrow")
    output.os = SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    output.os.pwrite = prof.wrap(os.pwrite, "write")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--top", type=int, default=8, help="slowest tensors to list")
    ap.add_argument("--json", help="write the per-tensor figures here")
    ap.add_argument("--cpu", action="store_true", help="time each phase in thread CPU time (shared machines)")
    args = ap.parse_args()
    import torch  # noqa: F401  (imports before the clock starts)

    import safemerge.api
    import safemerge.engine.run  # noqa: F401

    prof = Profiler(time.thread_time if args.cpu else time.perf_counter)
    instrument(prof)
    with tempfile.TemporaryDirectory(prefix="safemerge-profile-") as tmp:
        t0 = time.perf_counter()
        safemerge.api.merge(args.config, Path(tmp) / "out", options=RunOptions(threads=args.jobs, progress=False))
        wall = time.perf_counter() - t0
    busy = sum(prof.totals.values())
    ex = prof.executor_wall
    available = prof.executor_cpu if args.cpu else args.jobs * ex
    prof.totals["idle"] = max(0.0, available - busy)
    print(f"wall {wall:.2f} s: setup {wall - ex:.2f} s + executor {ex:.2f} s with -j {args.jobs} "
          f"({args.jobs * ex:.2f} worker-seconds, {prof.executor_cpu:.2f} CPU seconds)")
    print(f"{'phase':8} {'cpu s' if args.cpu else 'seconds':>9} {'share':>6}")
    for p in PHASES:
        print(f"{p:8} {prof.totals[p]:9.2f} {prof.totals[p] / available:6.1%}")
    print(f"\nslowest {args.top} tensors (seconds): " + " ".join(f"{p:>7}" for p in PHASES[:-1]))
    slow = sorted(prof.per_tensor.items(), key=lambda kv: -sum(kv[1].values()))[: args.top]
    for name, ph in slow:
        print(f"  {name[-45:]:45} " + " ".join(f"{ph[p]:7.2f}" for p in PHASES[:-1]))
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "executor_s": ex, "executor_cpu_s": prof.executor_cpu,
                                               "clock": "thread cpu" if args.cpu else "wall", "jobs": args.jobs,
                                               "totals": prof.totals,
                                               "per_tensor": prof.per_tensor}, indent=1) + "\n")


if __name__ == "__main__":
    main()
