"""Validation probes behind the demo zoo's recipes (issue 17): one recipe change, measured without the whole demo.

    # aligned SFT variant: every training harmful goal also refused under N look-alike-only phrasings
    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-s17 .venv/bin/python bench/recipe_probe.py aligned \
        --lookalike-framed-refusals 1 --external ../shared/datasets
    # erosion of a task-LoRA learning rate (the demo's TASK_RECIPE otherwise) on an aligned model
    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-s17 .venv/bin/python bench/recipe_probe.py erosion --lr 6e-4
    # the safety update's weight: aligned + w_f·ΔW_f + w_s·ΔW_s for a safety-LoRA variant (targets, steps), dense
    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-s17 .venv/bin/python bench/recipe_probe.py safety \
        --targets all-linear --steps 60 --weights 1:0.5,0.8:0.2

Both use the zoo exactly as ``safemerge demo`` builds it (cached) and measure on the demo's **validation** sets
(168 harmful, 50 look-alikes, 100 arithmetic; never the test sets), so a recipe is chosen before the demo runs.
The ``safety`` probe asks whether SafeMERGE's convex weights are what bind: it trains (or reuses) a safety-LoRA
variant on the zoo's safety data and measures aligned + w_f·ΔW_f + w_s·ΔW_s written as a full model (w_f = α,
w_s = 1 − α is SafeMERGE on every layer; w_s > 1 − α is a stronger safety update than the convex weight allows).
``--external DIR`` adds a second opinion from real data: Bianchi et al. malicious instructions (100) and XSTest
(250 safe prompts). Every probe appends one JSON line to ``-o`` (default ``bench/results/recipe_probe.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from safemerge.cache import cache_root, fingerprint


def _lookalike_framed_refusals(per_goal: int, seed: int = 0) -> list[dict[str, Any]]:
    """Refusals of every ``align`` harmful goal under ``per_goal`` of the look-alike frames that are neither
    training nor evaluation frames of harmful requests ("What's the best way to X?")."""
    from safemerge.data import safety_corpus as C
    from safemerge.demo.data import REFUSALS

    frames = [f for f in C.BENIGN_FRAMES if f not in C.TRAIN_FRAMES and f not in C.EVAL_FRAMES]
    r = random.Random(f"lookalike-framed-refusals-{seed}")
    return [{"prompt": f.format(g=g), "response": r.choice(REFUSALS), "category": c}
            for c, g in C.harmful_goals("align") for f in r.sample(frames, per_goal)]


def _rates(model: Path, adapter: Path | None, data: Path, out: Path, external: Path | None) -> dict[str, Any]:
    """Validation harmful rate, over-refusal and utility with the demo's per-suite token budgets, plus the external
    sets (``safemerge.evaluate.suites.evaluate_suites``, the evaluation automatic τ/α uses)."""
    from safemerge.demo.zoo import SMOLLM2_MAX_NEW_TOKENS
    from safemerge.evaluate.suites import evaluate_suites

    val = {name: str(data / f"val_{name}.jsonl") for name in ("harmful", "benign", "utility")}
    r = evaluate_suites(model, adapter=adapter, suites=val, max_new_tokens=SMOLLM2_MAX_NEW_TOKENS, out_dir=out / "val")
    res = {"val_harmful": r["harmful"]["harmful_rate"], "val_over_refusal": r["benign"]["over_refusal_rate"],
           "val_utility": r["utility"]["accuracy"]}
    if external is not None:
        real = {"harmful": str(external / "bianchi_malicious_instructions.json"),
                "benign": str(external / "xstest_prompts.csv")}
        x = evaluate_suites(model, adapter=adapter, suites=real, max_new_tokens=SMOLLM2_MAX_NEW_TOKENS,
                            out_dir=out / "external")
        res |= {"bianchi_malicious_harmful": x["harmful"]["harmful_rate"],
                "xstest_over_refusal": x["benign"]["over_refusal_rate"]}
    return res


def _safety_variant(zoo: Any, root: Path, targets: str | None, steps: int) -> Path:
    """The zoo's safety LoRA (``targets`` None and the default steps) or a variant trained on the same records."""
    from safemerge.demo import zoo as Z
    from safemerge.options import RunOptions
    from safemerge.train.lora import train_lora
    from safemerge.train.safety_lora import training_records

    if targets is None and steps == Z.SAFETY_SETTINGS["steps"]:
        return zoo.safety
    rows = Z.read_jsonl(zoo.data / "safety_train.jsonl")
    s = Z.SAFETY_SETTINGS
    out = root / f"safety-{fingerprint(zoo.aligned.name, rows, s, targets, steps)}"
    if not out.exists():
        records, _ = training_records(zoo.aligned, rows, seed=s["seed"], distill_benign=s["distill_benign"],
                                      progress=False)
        like = Z.TASK_RECIPE
        train_lora(zoo.aligned, records, out, rank=like.rank, alpha=like.alpha, targets=targets or list(like.targets),
                   steps=steps, batch_size=s["batch_size"], lr=s["lr"], max_length=s["max_length"],
                   precision=s["precision"], options=RunOptions(seed=s["seed"], progress=False))
    return out


def _weighted_model(aligned: Path, task: Path, safety: Path, w_f: float, w_s: float, out: Path) -> Path:
    """``aligned`` + w_f·ΔW_f + w_s·ΔW_s on every module either adapter touches, written as a full model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from safemerge.io.adapter import load_adapter
    from safemerge.io.output import atomic_output

    if out.exists():
        return out
    (weights,) = aligned.glob("*.safetensors")
    tensors = load_file(str(weights))
    for adapter, w in ((load_adapter(task), w_f), (load_adapter(safety), w_s)):
        for module in adapter:
            lora = adapter[module]
            name = lora.weight_name
            tensors[name] = (tensors[name].float() + w * lora.delta()).to(tensors[name].dtype)
    with atomic_output(out) as tmp:
        for f in aligned.iterdir():
            if f.is_file() and f != weights:
                shutil.copy2(f, tmp / f.name)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / weights.name), metadata={"format": "pt"})
    return out


def _safety_probe(args: argparse.Namespace, zoo: Any, root: Path) -> list[dict[str, Any]]:
    """One result per ``w_f:w_s`` point of ``--weights`` for the chosen safety-LoRA variant."""
    from safemerge.demo import zoo as Z

    safety = _safety_variant(zoo, root, args.targets, args.steps or Z.SAFETY_SETTINGS["steps"])
    results = []
    for point in args.weights.split(","):
        w_f, w_s = (float(x) for x in point.split(":"))
        model = _weighted_model(zoo.aligned, zoo.task, safety, w_f, w_s,
                                root / f"weighted-{fingerprint(safety.name, w_f, w_s)}")
        results.append({"probe": "safety", "safety": str(safety), "targets": args.targets or "task LoRA's",
                        "steps": args.steps or Z.SAFETY_SETTINGS["steps"], "w_f": w_f, "w_s": w_s,
                        **_rates(model, None, zoo.data, model / "probe-evals", args.external)})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("probe", choices=("aligned", "erosion", "safety"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--lookalike-framed-refusals", type=int, default=1, help="aligned: extra refusals per goal")
    ap.add_argument("--steps", type=int, default=None, help="aligned / safety: training steps (default: the demo's)")
    ap.add_argument("--targets", default=None, help="safety: LoRA targets (default: the task LoRA's), e.g. all-linear")
    ap.add_argument("--weights", default="0.8:0.2", help="safety: comma-separated w_f:w_s points")
    ap.add_argument("--lr", type=float, default=None, help="erosion: task-LoRA learning rate (default: the demo's)")
    ap.add_argument("--aligned", type=Path, default=None, help="erosion: aligned model (default: the zoo's)")
    ap.add_argument("--external", type=Path, default=None, help="directory with Bianchi malicious + XSTest")
    ap.add_argument("-o", "--out", type=Path, default=Path("bench/results/recipe_probe.jsonl"))
    args = ap.parse_args()

    from safemerge.demo import zoo as Z
    zoo = Z.build_smollm2_zoo(args.cache_dir, log=print)
    root = cache_root(args.cache_dir) / "bench-recipe-probe"
    t0 = time.perf_counter()
    if args.probe == "safety":
        _write(_safety_probe(args, zoo, root), args.out)
        return
    if args.probe == "aligned":
        recipe = replace(Z.ALIGN_RECIPE, steps=args.steps or Z.ALIGN_RECIPE.steps)
        rows = Z.read_jsonl(zoo.data / "align_train.jsonl") + _lookalike_framed_refusals(args.lookalike_framed_refusals)
        model = root / f"aligned-{fingerprint(rows, asdict(recipe))}"
        if not model.exists():
            Z.train_recipe(zoo.base, rows, model, recipe, merge=True)
        adapter, setting = None, {"lookalike_framed_refusals": args.lookalike_framed_refusals, "records": len(rows),
                                  "recipe": asdict(recipe)}
    else:
        model = args.aligned or zoo.aligned
        recipe = replace(Z.TASK_RECIPE, lr=args.lr or Z.TASK_RECIPE.lr)
        rows = Z.read_jsonl(zoo.data / "task_train.jsonl")
        adapter = root / f"task-{fingerprint(str(model), rows, asdict(recipe))}"
        if not adapter.exists():
            Z.train_recipe(model, rows, adapter, recipe, merge=False)
        setting = {"aligned": str(model), "recipe": asdict(recipe)}
    train_s = time.perf_counter() - t0
    result = {"probe": args.probe, **setting, "train_s": round(train_s, 1),
              **_rates(model, adapter, zoo.data, (adapter or model) / "probe-evals", args.external)}
    _write([result], args.out)


def _write(results: list[dict[str, Any]], out: Path) -> None:
    """Print each result and append it as one JSON line to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as fh:
        for result in results:
            print(json.dumps(result))
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
