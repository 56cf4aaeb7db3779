"""A/B wall time of ``safemerge merge`` at two commits, interleaved in one run (issue 16).

On a shared or noisy machine absolute timings drift by more than the changes being measured;
running the old and the new code alternately, several times, on the same inputs and page cache
makes the comparison fair. The code of ``--old`` (any git revision) is exported with ``git archive``
into a temporary directory and put first on ``PYTHONPATH``; ``--new`` defaults to the working tree.
Each round runs every variant once, in alternating order; reported: best and median wall (s) and
peak RSS (MB) per variant, the ratio new/old, and whether the outputs are byte-identical.

    .venv/bin/python bench/merge_ab.py CONFIG.yml [CONFIG2.yml ...] --old e60a7da [--rounds 5] [-j 2]

Not a test; the figures are only as steady as the machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_source(rev: str, dest: Path) -> Path:
    """``src/`` of git revision ``rev`` under ``dest`` (returned: the directory to put on PYTHONPATH)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def output_digest(out: Path) -> str:
    """SHA-256 over the output's safetensors files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def run_once(src: Path, config: Path, out: Path, jobs: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one ``safemerge merge`` with ``src`` first on the path."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "safemerge", "merge", str(config), str(out),
           "-j", str(jobs), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"merge failed ({src}):\n{proc.stderr[-2000:]}")
    wall, rss = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--old", required=True, help="git revision of the baseline")
    ap.add_argument("--new", help="git revision to compare (default: the working tree)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    report = {}
    with tempfile.TemporaryDirectory(prefix="safemerge-ab-") as tmp:
        root = Path(tmp)
        (root / "old").mkdir()
        variants = {"old": export_source(args.old, root / "old")}
        if args.new:
            (root / "new").mkdir()
            variants["new"] = export_source(args.new, root / "new")
        else:
            variants["new"] = REPO / "src"
        for config in args.configs:
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    times[name].append(run_once(variants[name], config, root / f"out_{name}", args.jobs))
            digests = {name: output_digest(root / f"out_{name}") for name in variants}
            row = {name: {"best_s": min(w for w, _ in t), "median_s": statistics.median(w for w, _ in t),
                          "peak_rss_mb": round(max(m for _, m in t)), "walls_s": [w for w, _ in t]}
                   for name, t in times.items()}
            row["new_over_old_best"] = round(row["new"]["best_s"] / row["old"]["best_s"], 3)
            row["new_over_old_median"] = round(row["new"]["median_s"] / row["old"]["median_s"], 3)
            row["identical_outputs"] = digests["old"] == digests["new"]
            report[str(config)] = row
            print(f"{config.name}: old best {row['old']['best_s']:.2f} s / median {row['old']['median_s']:.2f} s "
                  f"({row['old']['peak_rss_mb']} MB), new best {row['new']['best_s']:.2f} s / median "
                  f"{row['new']['median_s']:.2f} s ({row['new']['peak_rss_mb']} MB); new/old best "
                  f"{row['new_over_old_best']}, median {row['new_over_old_median']}; "
                  f"outputs identical: {row['identical_outputs']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"old": args.old, "new": args.new or "working tree", "jobs": args.jobs,
                                         "rounds": args.rounds, "load_average": os.getloadavg(),
                                         "results": report}, indent=1) + "\n")


if __name__ == "__main__":
    main()
