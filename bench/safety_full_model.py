"""Benchmark: the safety commands' full-model writes on the engine (issue 12, one executor).

Builds a random-init Llama with SmolLM2-135M-like shapes (hidden 576, 30 layers, vocab 49152, float32 on disk,
~147 M parameters; built once and cached in the work directory) and times, each in a fresh process with its peak
RSS: ``safemerge resta``, ``safemerge mergealign`` and ``safemerge safelora`` on a full fine-tune (every layer
projected, the dense ``C·ΔW`` path). Prints one line per command and the SHA-256 of each output's weights (the same
on every run of the same code on one machine).

Run:  .venv/bin/python bench/safety_full_model.py [--work DIR] [--reps 2]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_models(work: Path) -> Path:
    models = work / "models"
    if (models / "ft" / "config.json").exists():
        return models
    sys.path.insert(0, str(ROOT / "src"))
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    model = make_tiny_model("llama", seed=0, hidden=576, layers=30, vocab_size=49152)
    save_model(model, models / "base")
    perturb_model(model, seed=1, scale=0.02)
    save_model(model, models / "aligned")
    perturb_model(model, seed=2, scale=0.01)
    save_model(model, models / "ft")
    return models


def commands(m: Path) -> dict[str, list[str]]:
    return {
        "resta": ["resta", "--unaligned", f"{m}/base", "--aligned", f"{m}/aligned", "--finetuned", f"{m}/ft"],
        "mergealign": ["mergealign", "--pretrained", f"{m}/base", "--domain", f"{m}/ft", "--aligned", f"{m}/aligned"],
        "safelora_full": ["safelora", "--base", f"{m}/base", "--aligned", f"{m}/aligned", "--finetuned", f"{m}/ft",
                          "--tau", "0.9"],
    }


def run_one(args: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one CLI run in a fresh process (``os.wait4``: that child's own rusage)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "safemerge.cli", *args, "-o", str(out), "-q", "--no-progress",
                             "--force"], env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed")
    return wall, usage.ru_maxrss / 1e6  # KB → GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "safemerge_bench_safety_full")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        build_models(a.work)
        return
    # built in a child: a child's peak RSS counts the pages it shared with this process before exec
    subprocess.run([sys.executable, __file__, "--work", str(a.work), "--build-only"], check=True)
    models = a.work / "models"
    print(f"models in {models} (147 M parameters, float32); load: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, args in commands(models).items():
        runs = [run_one(args, a.work / f"out_{name}") for _ in range(a.reps)]
        digest = hashlib.sha256((a.work / f"out_{name}" / "model.safetensors").read_bytes()).hexdigest()[:16]
        print(f"{name:14s} wall {min(w for w, _ in runs):6.2f} s (best of {a.reps})  "
              f"peak RSS {max(r for _, r in runs):5.2f} GB  sha256 {digest}")


if __name__ == "__main__":
    main()
