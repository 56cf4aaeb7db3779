"""Benchmark the merge-method kernels against mergekit 0.1.5 on one large tensor.

For every method: median wall time of our registered function vs mergekit's in-memory
``merge_tensors`` on the same float32 inputs (a SIZE×SIZE matrix, N models + base), the largest
absolute difference between the two outputs, and (``--memory``) the peak extra resident memory
of one call (result included), measured in a fresh subprocess per (method, implementation)
as peak RSS (Linux ``VmHWM``, reset via ``/proc/self/clear_refs``) minus the RSS with the inputs
already allocated.

    .venv/bin/python bench/methods.py --size 2048 --models 3 --repeats 3 --memory

``--row-blocks`` adds, for the methods with a row-block kernel (``methods/streaming.py``), the
same merge through that kernel in the engine's 512 KB blocks (inputs sliced and copied block by
block, as the engine reads them): its time, peak extra memory (with ``--memory``) and whether its
output is bit-identical to the whole-tensor function's (``same bits``).

    .venv/bin/python bench/methods.py --methods ties,dare_ties,breadcrumbs,della --row-blocks --memory

Prints a table and writes ``bench/results/methods.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

METHODS = [
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "multislerp", "model_stock", "sce", "karcher",
    "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
]
STOCHASTIC = {"dare_linear", "dare_ties", "della", "della_linear"}


def make_case(name: str, size: int, n_models: int, seed: int = 0):
    """Inputs and parameters for one method, in both calling conventions."""
    from safemerge.methods import get_method

    g = torch.Generator().manual_seed(seed)
    # built in place (no temporaries) so the peak-memory baseline is just the inputs
    base = torch.empty(size, size).normal_(generator=g).mul_(0.02)
    n = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "nuslerp": 2}.get(name, n_models)
    tensors = [torch.empty(size, size).normal_(generator=g).mul_(0.002).add_(base) for _ in range(n)]
    method = get_method(name)
    in_tensors = method.extra["base_in_tensors"]
    per_model: dict = {}
    params: dict = {}
    if method.param("weight"):
        per_model["weight"] = [1.0 / n] * n
    if method.param("density"):
        per_model["density"] = [0.5] * n
    if name in ("slerp",):
        params["t"] = 0.4
    if name == "nearswap":
        params["t"] = 0.001
    if name == "sce":
        params["select_topk"] = 0.5
    return method, tensors, (None if in_tensors else base), per_model, params


def run_ours(method, tensors, base, per_model, params, seed: int = 0) -> torch.Tensor:
    full = {p.name: p.default for p in method.global_params}
    full.update(params)
    pm = {p.name: per_model.get(p.name, [p.default] * len(tensors)) for p in method.per_model_params}
    gen = torch.Generator().manual_seed(seed) if method.stochastic else None
    return method.fn(tensors, base, per_model=pm, params=full, generator=gen)


def run_blocks(method, tensors, base, per_model, params, seed: int = 0) -> torch.Tensor:
    """The same merge through the method's row-block kernel (``methods/streaming.py``), in the
    engine's block size; each block read is a copy, as the engine's reads are."""
    from safemerge.engine.run import ELEMENTWISE_BLOCK_BYTES
    from safemerge.methods.blocks import TwoPassJob
    from safemerge.methods.streaming import TWO_PASS

    full = {p.name: p.default for p in method.global_params}
    full.update(params)
    pm = {p.name: per_model.get(p.name, [p.default] * len(tensors)) for p in method.per_model_params}
    gen = torch.Generator().manual_seed(seed) if method.stochastic else None
    out = torch.empty_like(base)

    def emit(rows, part):
        out[rows[0] : rows[1]] = part

    job = TwoPassJob(lambda i, rows: tensors[i][slice(*rows) if rows else slice(None)].clone(),
                     lambda rows: base[slice(*rows) if rows else slice(None)].clone(),
                     len(tensors), tuple(base.shape), pm, full, ELEMENTWISE_BLOCK_BYTES, emit, generator=gen)
    done = TWO_PASS[method.name](job)
    if not done:
        raise RuntimeError(f"{method.name}: the row-block kernel declined these parameters")
    return out


def run_mergekit(name, tensors, base, per_model, params, seed: int = 0) -> torch.Tensor:
    from mergekit.merge_methods.api import merge_tensors

    torch.manual_seed(seed)
    parameters = {**params, **per_model}
    if base is None:
        return merge_tensors(tensors, name, parameters=parameters)
    return merge_tensors([*tensors, base], name, parameters=parameters, base_index=len(tensors))


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_child(name: str, impl: str, size: int, n_models: int) -> None:
    """Subprocess body: print the ru_maxrss growth (MiB) caused by one call."""
    torch.set_num_threads(1)
    method, tensors, base, per_model, params = make_case(name, size, n_models)
    if impl == "mergekit":
        import mergekit.merge_methods  # noqa: F401  (import cost outside the measurement)
    before = _reset_peak_rss_kib()
    run = {"ours": run_ours, "blocks": run_blocks}.get(impl)
    out = run(method, tensors, base, per_model, params) if run else run_mergekit(name, tensors, base, per_model, params)
    after = _peak_rss_kib()
    del out
    # the result itself is one tensor; report everything above the inputs, result included
    print(json.dumps({"peak_extra_mib": (after - before) / 1024}))


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss_kib() -> int:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5) and return the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory(name: str, impl: str, size: int, n_models: int) -> float | None:
    cmd = [sys.executable, __file__, "--child", name, "--impl", impl, "--size", str(size), "--models", str(n_models)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return None
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"])


def two_pass_methods() -> set[str]:
    from safemerge.methods.streaming import TWO_PASS

    return set(TWO_PASS)


def block_row(name: str, method, tensors, base, per_model, params, args) -> dict:
    """Time, bit-identity and (``--memory``) peak extra memory of the row-block kernel."""
    row = {"blocks_s": time_call(lambda: run_blocks(method, tensors, base, per_model, params), args.repeats),
           "blocks_same_bits": torch.equal(run_blocks(method, tensors, base, per_model, params),
                                           run_ours(method, tensors, base, per_model, params))}
    if args.memory:
        row["blocks_peak_extra_mib"] = measure_memory(name, "blocks", args.size, args.models)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="matrix side (default 2048 → 16 MiB per fp32 tensor)")
    ap.add_argument("--models", type=int, default=3, help="non-base models for N-ary methods")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="also measure peak extra RSS per call (subprocesses)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--row-blocks", action="store_true",
                    help="also run the methods that have one through their row-block kernel (time, memory, same bits)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        peak_memory_child(args.child, args.impl, args.size, args.models)
        return
    torch.set_num_threads(args.threads)
    rows = []
    tensor_mib = args.size * args.size * 4 / 2**20
    memory_columns = f" {'ours MiB':>9s} {'mk MiB':>8s}" if args.memory else ""
    print(f"{'method':18s} {'ours s':>8s} {'mergekit s':>10s} {'speedup':>8s} {'max|Δ|':>9s}" + memory_columns)
    for name in args.methods.split(","):
        method, tensors, base, per_model, params = make_case(name, args.size, args.models)
        t_ours = time_call(lambda: run_ours(method, tensors, base, per_model, params), args.repeats)
        t_mk = time_call(lambda: run_mergekit(name, tensors, base, per_model, params), args.repeats)
        diff = (run_ours(method, tensors, base, per_model, params) - run_mergekit(name, tensors, base, per_model,
                                                                                  params)).abs().max().item()
        row = {"method": name, "ours_s": t_ours, "mergekit_s": t_mk, "speedup": t_mk / t_ours, "max_abs_diff": diff}
        if args.memory:
            row["ours_peak_extra_mib"] = measure_memory(name, "ours", args.size, args.models)
            row["mergekit_peak_extra_mib"] = measure_memory(name, "mergekit", args.size, args.models)
        rows.append(row)
        line = f"{name:18s} {t_ours:8.3f} {t_mk:10.3f} {t_mk / t_ours:7.2f}x {diff:9.2e}"
        if args.memory:
            line += f" {row['ours_peak_extra_mib']:9.0f} {row['mergekit_peak_extra_mib']:8.0f}"
        if args.row_blocks and base is not None and name in two_pass_methods():
            row.update(block_row(name, method, tensors, base, per_model, params, args))
            line += f"  row blocks: {row['blocks_s']:.3f} s, same bits {row['blocks_same_bits']}"
            if args.memory:
                line += f", {row['blocks_peak_extra_mib']:.0f} MiB"
        print(line, flush=True)
    result = {
        "benchmark": "methods",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "size": [args.size, args.size],
        "tensor_mib": tensor_mib,
        "models": args.models,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip(),
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / "methods.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
