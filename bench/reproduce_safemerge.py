"""Reproduce SafeMERGE's main table at 135M scale with real safety data (issues 5 and 17).

The same pipeline as ``safemerge demo`` (SmolLM2-135M-Instruct zoo → scan → SafeMERGE, SafeLoRA,
RESTA, ``safemerge repair`` with automatic τ/α, the paper's controls → evaluation), with every safety
role filled from ``../shared/datasets`` (``safemerge.demo.zoo.real_data_sets``):

* safety SFT (``aligned``) and safety LoRA: two disjoint slices (630 and 208 records) of Bianchi et
  al.'s ``bianchi_safety_only.json`` (a training split), the SFT mixed with benign look-alikes
  self-distilled from the base model;
* harm test: Bianchi malicious instructions (100) + XSTest unsafe prompts (200); over-refusal test:
  XSTest safe prompts (250); validation: 168 held-out Bianchi safety-only prompts + the project's 50
  benign look-alikes;
* utility: the project's arithmetic word problems (640 train, 100 validation, 200 independently
  phrased test problems) — GSM8K is 0–3% for every row at 135M, so it cannot show utility kept.

Prints the measured table beside the paper's (secondary-source) numbers and writes
``bench/results/reproduce_safemerge.json``. About an hour on 2 CPU cores on the first call (the
safety SFT is most of it); models and generations are cached (``--cache-dir``), so reruns only
re-assemble the report.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_safemerge.py --data-dir ../shared/datasets
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# SafeMERGE v3, Llama-3.1-8B-Instruct / GSM8K (safemerge_safelora.md §3; secondary sources, % harmful on DirectHarm4).
PAPER = {
    "aligned": {"utility": 73.80, "harmful": 11.30},
    "fine-tuned": {"utility": 78.24, "harmful": 28.30},
    "RESTA": {"utility": 74.20, "harmful": 11.90},
    "SafeLoRA": {"utility": 77.90, "harmful": 15.10},
    "SafeMERGE": {"utility": 78.50, "harmful": 8.80},
}

# id prefix of a harmful test prompt -> its source (the harm test set joins two datasets; see real_data_sets)
SOURCES = {"malicious_instructions": "Bianchi malicious", "xstest": "XSTest unsafe"}


def _harmful_by_source(run_dir: Path) -> dict[str, float]:
    """Harmful rate of one row per source dataset, from the row's judgments (``runs/<row>/harmful``)."""
    counts: dict[str, list[int]] = {name: [0, 0] for name in SOURCES.values()}
    for line in (run_dir / "harmful" / "judgments.jsonl").read_text(encoding="utf-8").splitlines():
        j = json.loads(line)
        source = next(name for prefix, name in SOURCES.items() if j["id"].startswith(prefix))
        counts[source][0] += bool(j["harmful"])
        counts[source][1] += 1
    return {name: round(k / n, 4) for name, (k, n) in counts.items() if n}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--data-dir", type=Path, default=here.parent.parent / "shared" / "datasets")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("-o", "--out", type=Path, default=here / "results" / "reproduce_safemerge_out")
    ap.add_argument("--json", type=Path, default=here / "results" / "reproduce_safemerge.json")
    ap.add_argument("--stress", action="store_true", help="also repair the aggressive fine-tune (the stress setting)")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.markup import escape

    from safemerge.demo.pipeline import print_table, run_demo
    from safemerge.tuning.report import print_pareto

    err = Console(stderr=True)
    t0 = time.perf_counter()
    res = run_demo(out=args.out, data_dir=args.data_dir, cache_dir=args.cache_dir, stress=args.stress,
                   log=lambda m: err.print(f"[dim]{escape(m)}[/dim]"))
    wall = time.perf_counter() - t0
    con = Console()
    print_table(res, con)
    print_pareto(res.autotune, con)
    rows = [{**r.to_dict(), "harmful_by_source": _harmful_by_source(args.out / r.results["_copied_to"])}
            for r in res.rows]
    print("\nmeasured (135M, keyword judge; utility = arithmetic) vs paper (Llama-3.1-8B, Llama-Guard-3; GSM8K):")
    print(f"{'row':<24} {'harmful %':>10} {'paper':>7} {'utility %':>10} {'paper':>7} {'over-refusal %':>15}")
    print("\nharmful rate by source (%):", ", ".join(SOURCES.values()))
    for r in rows:
        print(f"  {r['name']:<24} " + "  ".join(f"{100 * v:5.1f}" for v in r["harmful_by_source"].values()))
    for r in rows:
        p = PAPER.get(r["name"], {})
        f = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
        print(f"{r['name']:<24} {f(r['harmful_rate']):>10} {p.get('harmful', '—')!s:>7} {f(r['utility']):>10} "
              f"{p.get('utility', '—')!s:>7} {f(r['over_refusal_rate']):>15}")
    # a cached rerun only re-assembles the report (same rows): keep the timings of the run that built everything
    first_run = {"wall_s": round(wall, 1), "timings_s": {k: round(v, 1) for k, v in res.timings.items()}}
    if args.json.is_file():
        try:
            prev = json.loads(args.json.read_text())
        except ValueError:
            prev = {}
        same = [{k: v for k, v in r.items() if k != "harmful_by_source"} for r in prev.get("rows", [])]
        if same == json.loads(json.dumps([r.to_dict() for r in res.rows], default=str)) and prev.get("first_run"):
            first_run = prev["first_run"]
    out = {
        "first_run": first_run,
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/reproduce_safemerge.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": round(wall, 1),
        "timings_s": {k: round(v, 1) for k, v in res.timings.items()},
        "rows": rows,
        "paper": PAPER,
        "checks": res.checks,
        "autotune": res.autotune.to_dict(),
        "report": str(args.out / "report.md"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
