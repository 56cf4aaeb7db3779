"""Measure the demo zoo's recipes (issue 17) without the whole demo: loss curves and a few rows on test prefixes.

    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-science .venv/bin/python bench/demo_recipes.py \
        --limit 56,50,50 --alphas 0.3,0.5,0.7 -o bench/results/demo_recipes.json

Builds (or reuses) the SmolLM2 zoo exactly as ``safemerge demo`` does, prints the loss curve of every
trained step (aligned SFT, task LoRA, safety LoRA), then evaluates on the first N items of the demo's
test sets (harmful, benign, utility; the sets are ordered so that a prefix spans every goal):
aligned, aligned + ΔW_s (safety LoRA alone), fine-tuned, α ΔW_f + (1−α) ΔW_s on all layers for each
``--alphas`` value (the uniform control; SafeMERGE's selection merges a subset), and base.
Every number comes with its 95 % bootstrap interval. Generations are cached, so a rerun is cheap.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _curve(path: Path) -> str:
    from safemerge.train.safety_lora import loss_curve

    if not (path / "training_log.json").exists():
        return "(no training_log.json)"
    log = json.loads((path / "training_log.json").read_text())
    pts = loss_curve(log["losses"], points=5)
    return f"{log['records']} records, {len(log['losses'])} steps; loss " + " → ".join(f"{v:.3f}" for _, v in pts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--limit", default="56,50,50", help="test items per suite: harmful,benign,utility")
    ap.add_argument("--alphas", default="0.3,0.5,0.7", help="uniform-α merges to evaluate ('' for none)")
    ap.add_argument("--stress", action="store_true", help="also build and evaluate the stress task LoRA")
    ap.add_argument("-o", "--out", default=None, help="write the measured rows as JSON")
    args = ap.parse_args()

    from safemerge.cache import cache_root, fingerprint
    from safemerge.demo.pipeline import ALL_LAYERS_TAU
    from safemerge.demo.zoo import build_smollm2_zoo
    from safemerge.evaluate.suites import evaluate_suites
    from safemerge.safety.api import safemerge_adapters
    from safemerge.safety.settings import SafeMergeModels, SafeMergeSettings

    t0 = time.perf_counter()
    zoo = build_smollm2_zoo(args.cache_dir, stress=args.stress, log=print)
    print(f"zoo ready in {time.perf_counter() - t0:.0f} s")
    for name, path in (
        ("aligned SFT", zoo.aligned),
        ("task LoRA", zoo.task),
        ("safety LoRA", zoo.safety),
        ("stress task LoRA", zoo.stress_task),
    ):
        if path is not None:
            print(f"{name:17s} {_curve(path)}")
    limits = dict(zip(("harmful", "benign", "utility"), (int(x) for x in args.limit.split(","))))
    root = cache_root(args.cache_dir) / "bench-demo-recipes"
    rows = [
        ("aligned", zoo.aligned, None),
        ("safety LoRA alone", zoo.aligned, zoo.safety),
        ("fine-tuned", zoo.aligned, zoo.task),
    ]
    tasks = [("", zoo.task)] + ([("stress ", zoo.stress_task)] if zoo.stress_task else [])
    if zoo.stress_task:
        rows.append(("stress fine-tuned", zoo.aligned, zoo.stress_task))
    for prefix, task in tasks:
        for a in (float(x) for x in args.alphas.split(",") if x.strip()):
            merged = root / "merged" / fingerprint(task.name, zoo.safety.name, a)
            if not merged.exists():
                merged.parent.mkdir(parents=True, exist_ok=True)
                safemerge_adapters(SafeMergeModels(zoo.base, zoo.aligned, task, zoo.safety), merged,
                                   settings=SafeMergeSettings(tau=ALL_LAYERS_TAU, alpha=a))
            rows.append((f"{prefix}uniform α={a:g}", zoo.aligned, merged))
    rows.append(("base", zoo.base, None))
    measured = []
    print(f"\n{'row':24s} {'harmful':>20s} {'over-refusal':>20s} {'utility':>20s}   seconds")
    for name, model, adapter in rows:
        t = time.perf_counter()
        res = evaluate_suites(
            model,
            adapter=adapter,
            suites=zoo.eval_sets,
            max_new_tokens=zoo.max_new_tokens,
            out_dir=root / "evals" / fingerprint(str(model), str(adapter)),
            limits=limits,
        )
        cells = []
        for suite, key in (("harmful", "harmful_rate"), ("benign", "over_refusal_rate"), ("utility", "accuracy")):
            v, ci = res[suite][key], res[suite]["ci"]
            cells.append(f"{100 * v:5.1f}% [{100 * ci[0]:4.1f}–{100 * ci[1]:4.1f}]")
        print(
            f"{name:24s} {cells[0]:>20s} {cells[1]:>20s} {cells[2]:>20s}   {time.perf_counter() - t:6.0f}", flush=True
        )
        measured.append(
            {
                "row": name,
                "model": str(model),
                "adapter": str(adapter) if adapter else None,
                **{
                    s: {k: res[s][k] for k in ("n", "ci")} | {"rate": res[s][m]}
                    for s, m in (("harmful", "harmful_rate"), ("benign", "over_refusal_rate"), ("utility", "accuracy"))
                },
            }
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"limits": limits, "rows": measured}, indent=2) + "\n")


if __name__ == "__main__":
    main()
