"""A/B of one method's row-block kernel at two commits, in CPU time, interleaved (issue 16).

On a machine shared with other jobs, wall times of whole merges drift by more than the changes being
measured, and a low-priority process may get a few % of a core. This runs the method's row-block
("two-pass") kernel (``methods/streaming.py::TWO_PASS``) on one in-memory tensor — three bf16-valued
experts over a bf16 base, read block by block as float32 as the engine reads them, each merged block
narrowed to bf16 and hashed — in a fresh process per variant, alternating old and new code, and
reports the best and median **process CPU time** per tensor entry and whether the hashes agree.
No reads from disk, no writes: the kernel and its float32 loads only.

    .venv/bin/python bench/kernel_ab.py ties --old d887405 [--rounds 3] [--shape 4096x2048]

Not a test; CPU times on a loaded machine are inflated too (shared caches), only the ratio counts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(method: str, shape: tuple[int, int], reps: int) -> dict[str, float | str]:
    """Best process CPU time of ``reps`` runs of the kernel (this process's ``safemerge``)."""
    import torch

    from safemerge.engine.run import tune_allocator
    from safemerge.methods.blocks import TwoPassJob
    from safemerge.methods.streaming import TWO_PASS

    torch.set_num_threads(1)
    tune_allocator()
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(shape, generator=g) * 0.001).to(torch.bfloat16) for _ in range(3)]

    def rows_f32(src: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        part = src if rows is None else src[rows[0] : rows[1]]
        return torch.empty(part.shape).copy_(part)

    digest = hashlib.sha256()

    def emit(rows: tuple[int, int], block: torch.Tensor) -> None:
        digest.update(block.to(torch.bfloat16).view(torch.int16).numpy().tobytes())

    params = {"select_topk": 0.5} if method == "sce" else {}
    job = TwoPassJob(lambda i, rows: rows_f32(models[i], rows), lambda rows: rows_f32(base, rows), 3, shape,
                     {"weight": [0.5, 0.3, 0.2], "density": [0.5] * 3}, params, 512 << 10, emit)
    best = float("inf")
    for _ in range(reps):
        digest = hashlib.sha256()
        t0 = time.process_time()
        assert TWO_PASS[method](job)
        best = min(best, time.process_time() - t0)
    return {"cpu_s": best, "ns_per_entry": best / (shape[0] * shape[1]) * 1e9, "digest": digest.hexdigest()}


def export_source(rev: str, dest: Path) -> Path:
    """``src/`` of git revision ``rev`` under ``dest`` (returned: the directory to put on PYTHONPATH)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", help="a method with a row-block kernel: ties, sce, breadcrumbs, …")
    ap.add_argument("--old", help="git revision of the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", default="4096x2048")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    if args.child:
        print(json.dumps(measure(args.method, shape, 3)))  # type: ignore[arg-type]
        return
    if not args.old:
        ap.error("--old is required")
    with tempfile.TemporaryDirectory(prefix="safemerge-kab-") as tmp:
        variants = {"old": export_source(args.old, Path(tmp)), "new": REPO / "src"}
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for r in range(args.rounds):
            for name in list(variants) if r % 2 == 0 else list(reversed(variants)):
                env = {**os.environ, "PYTHONPATH": str(variants[name])}
                proc = subprocess.run([sys.executable, __file__, args.method, "--shape", args.shape, "--child"],
                                      env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
                runs[name].append(json.loads(proc.stdout))
    for name, rs in runs.items():
        ns = [r["ns_per_entry"] for r in rs]
        print(f"{args.method} {name}: best {min(ns):.2f} ns/entry, median {statistics.median(ns):.2f} "
              f"({', '.join(f'{x:.2f}' for x in ns)})")
    same = {r["digest"] for rs in runs.values() for r in rs}
    best = {name: min(r["ns_per_entry"] for r in rs) for name, rs in runs.items()}
    print(f"new/old best {best['new'] / best['old']:.3f}; outputs identical: {len(same) == 1}; "
          f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
