"""Validation probes behind the demo zoo's recipes (issue 17): one recipe change, measured without the whole demo.

    # aligned SFT variant: every training harmful goal also refused under N look-alike-only phrasings
    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-s17 .venv/bin/python bench/recipe_probe.py aligned \
        --lookalike-framed-refusals 1 --external ../shared/datasets
    # erosion of a task-LoRA learning rate (the demo's TASK_RECIPE otherwise) on an aligned model
    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-s17 .venv/bin/python bench/recipe_probe.py erosion --lr 6e-4
    # the safety update's weight: aligned + w_f·ΔW_f + w_s·ΔW_s for a safety-LoRA variant (targets, steps, cap), dense
    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-s17 .venv/bin/python bench/recipe_probe.py safety \
        --targets all-linear --steps 60 --weights 1:0.5,0.8:0.2
    # the safety LoRA alone (w_f 0, w_s 1) with two self-distilled look-alike answers per safety record
    HF_HUB_OFFLINE=1 SAFEMERGE_CACHE=/work/cache-s17 .venv/bin/python bench/recipe_probe.py safety \
        --distilled-per-record 2 --weights 0:1

Both use the zoo exactly as ``safemerge demo`` builds it (cached) and measure on the demo's **validation** sets
(168 harmful, 250 look-alikes, 200 arithmetic; never the test sets), so a recipe is chosen before the demo runs.
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from safemerge.cache import cache_root, fingerprint
from safemerge.io.checkpoint import layer_index


def _lookalike_framed_refusals(per_goal: int, seed: int = 0) -> list[dict[str, Any]]:
    """Refusals of every ``align`` harmful goal under ``per_goal`` of the look-alike frames that are neither
    training nor evaluation frames of harmful requests ("What's the best way to X?")."""
    from safemerge.data import safety_corpus as C
    from safemerge.demo.data import REFUSALS

    frames = [f for f in C.BENIGN_FRAMES if f not in C.TRAIN_FRAMES and f not in C.EVAL_FRAMES]
    r = random.Random(f"lookalike-framed-refusals-{seed}")
    return [{"prompt": f.format(g=g), "response": r.choice(REFUSALS), "category": c}
            for c, g in C.harmful_goals("align") for f in r.sample(frames, per_goal)]


def _rates(model: Path, adapter: Path | None, data: Path, out: Path, external: Path | None,
           split: str = "val") -> dict[str, Any]:
    """Harmful rate, over-refusal and utility on the ``split`` sets (``val``; ``eval``: the demo's test sets, only to
    confirm a choice made on validation) with the demo's per-suite token budgets, plus the external sets
    (``safemerge.evaluate.suites.evaluate_suites``, the evaluation automatic τ/α uses)."""
    from safemerge.demo.zoo import SMOLLM2_MAX_NEW_TOKENS
    from safemerge.evaluate.suites import evaluate_suites

    sets = {name: str(data / f"{split}_{name}.jsonl") for name in ("harmful", "benign", "utility")}
    r = evaluate_suites(model, adapter=adapter, suites=sets, max_new_tokens=SMOLLM2_MAX_NEW_TOKENS, out_dir=out / split)
    res = {f"{split}_harmful": r["harmful"]["harmful_rate"], f"{split}_over_refusal": r["benign"]["over_refusal_rate"],
           f"{split}_utility": r["utility"]["accuracy"],
           f"{split}_ci": {k: r[k]["ci"] for k in ("harmful", "benign", "utility")}}
    if external is not None:
        real = {"harmful": str(external / "bianchi_malicious_instructions.json"),
                "benign": str(external / "xstest_prompts.csv")}
        x = evaluate_suites(model, adapter=adapter, suites=real, max_new_tokens=SMOLLM2_MAX_NEW_TOKENS,
                            out_dir=out / "external")
        res |= {"bianchi_malicious_harmful": x["harmful"]["harmful_rate"],
                "xstest_over_refusal": x["benign"]["over_refusal_rate"]}
    return res


def _safety_recipe(targets: str | None, steps: int, unlikelihood: float | None = None) -> tuple[Any, Any]:
    """The zoo's safety-LoRA training (shape of the task LoRA, ``SAFETY_SETTINGS``) with other targets / steps /
    unlikelihood weight (``None``: the zoo's)."""
    from safemerge.demo import zoo as Z
    from safemerge.train.recipe import LoraShape

    like = Z.TASK_RECIPE
    shape = LoraShape(rank=like.rank, alpha=like.alpha, targets=targets or list(like.targets))
    recipe = replace(Z.safety_training_recipe(), steps=steps)
    return shape, recipe if unlikelihood is None else replace(recipe, unlikelihood_weight=unlikelihood)


def _safety_variant(zoo: Any, root: Path, args: argparse.Namespace) -> Path:
    """The zoo's safety LoRA (no variant option given) or a variant trained on the same records with other
    ``--targets``, ``--steps``, ``--distilled-per-record`` self-distilled answers per safety record or
    ``--unlikelihood`` weight (refusal openings made unlikely after look-alikes)."""
    from safemerge.demo import zoo as Z
    from safemerge.options import RunOptions
    from safemerge.train.safety_lora import fit_safety_adapter, training_records

    s = dict(Z.SAFETY_SETTINGS)
    s |= {"steps": args.steps} if args.steps else {}
    s |= {"distilled_per_record": args.distilled_per_record} if args.distilled_per_record else {}
    s |= {"unlikelihood": args.unlikelihood} if args.unlikelihood is not None else {}
    if args.targets is None and s == Z.SAFETY_SETTINGS:
        return zoo.safety
    rows = Z.read_jsonl(zoo.data / "safety_train.jsonl")
    out = root / f"safety-{fingerprint(zoo.aligned.name, rows, s, args.targets, s['steps'])}"
    if not out.exists():
        records, _ = training_records(zoo.aligned, rows, seed=s["seed"], distill_benign=s["distill_benign"],
                                      distilled_per_record=s["distilled_per_record"], progress=False)
        shape, recipe = _safety_recipe(args.targets, s["steps"], args.unlikelihood)
        fit_safety_adapter(zoo.aligned, records, out, shape=shape, recipe=recipe, distill_benign=s["distill_benign"],
                           options=RunOptions(seed=s["seed"], progress=False))
    return out


Weight = float | Callable[[str], float]


def _weighted_model(aligned: Path, updates: list[tuple[Path, Weight]], out: Path) -> Path:
    """``aligned`` + Σ w·ΔW over ``updates`` (adapter, w) on every module an adapter touches, as a full model; ``w``
    is a number or a function of the module's name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from safemerge.io.adapter import load_adapter
    from safemerge.io.output import atomic_output

    if out.exists():
        return out
    (weights,) = aligned.glob("*.safetensors")
    tensors = load_file(str(weights))
    for path, w in updates:
        adapter = load_adapter(path)
        for module in adapter:
            lora = adapter[module]
            name = lora.weight_name
            weight = w(module) if callable(w) else w
            tensors[name] = (tensors[name].float() + weight * lora.delta()).to(tensors[name].dtype)
    with atomic_output(out) as tmp:
        for f in aligned.iterdir():
            if f.is_file() and f != weights:
                shutil.copy2(f, tmp / f.name)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / weights.name), metadata={"format": "pt"})
    return out


def _weighted_points(args: argparse.Namespace, zoo: Any, root: Path, update: Path,
                     prefix: str) -> Iterator[tuple[float, float, Path]]:
    """``(w_f, w, model)`` for each ``w_f:w`` point of ``--weights``: aligned + w_f·ΔW_f + w·ΔW of ``update``, written
    once under ``root/<prefix>-<hash>``."""
    for point in args.weights.split(","):
        w_f, w = (float(x) for x in point.split(":"))
        yield w_f, w, _weighted_model(zoo.aligned, [(zoo.task, w_f), (update, w)],
                                      root / f"{prefix}-{fingerprint(update.name, w_f, w)}")


def _safety_probe(args: argparse.Namespace, zoo: Any, root: Path) -> list[dict[str, Any]]:
    """One result per ``w_f:w_s`` point of ``--weights`` for the chosen safety-LoRA variant."""
    from safemerge.demo import zoo as Z

    safety = _safety_variant(zoo, root, args)
    results = []
    for w_f, w_s, model in _weighted_points(args, zoo, root, safety, "weighted"):
        results.append({"probe": "safety", "safety": str(safety), "targets": args.targets or "task LoRA's",
                        "steps": args.steps or Z.SAFETY_SETTINGS["steps"], "w_f": w_f, "w_s": w_s,
                        "distilled_per_record": args.distilled_per_record or Z.SAFETY_SETTINGS["distilled_per_record"],
                        "unlikelihood": Z.safety_training_recipe().unlikelihood_weight
                        if args.unlikelihood is None else args.unlikelihood,
                        **_rates(model, None, zoo.data, model / "probe-evals", args.external, args.split)})
    return results


def _correction_probe(args: argparse.Namespace, zoo: Any, root: Path) -> list[dict[str, Any]]:
    """A safety LoRA trained on the fine-tune itself (aligned + ΔW_f merged), so ΔW_c learns to undo the erosion the
    fine-tune has rather than refusals the aligned model already gives. As SafeMERGE's safety LoRA
    ΔW_s = ΔW_f + ΔW_c (rank 2r), the convex merge α ΔW_f + (1−α) ΔW_s is ΔW_f + (1−α) ΔW_c: the task update is
    kept whole. One result per ``w_f:w_c`` point of ``--weights``."""
    from safemerge.demo import zoo as Z
    from safemerge.options import RunOptions
    from safemerge.train.lora import train_lora
    from safemerge.train.safety_lora import training_records

    s = Z.SAFETY_SETTINGS
    steps = args.steps or s["steps"]
    fine = _weighted_model(zoo.aligned, [(zoo.task, 1.0)], root / f"fine-{fingerprint(zoo.task.name)}")
    rows = Z.read_jsonl(zoo.data / "safety_train.jsonl")
    replay = Z.read_jsonl(zoo.data / "task_train.jsonl")[: args.replay] if args.replay else []
    key = (fine.name, rows, s, args.targets, steps) + ((replay,) if replay else ())
    correction = root / f"correction-{fingerprint(*key)}"
    t0 = time.perf_counter()
    if not correction.exists():
        records, _ = training_records(fine, rows + replay, seed=s["seed"], distill_benign=s["distill_benign"],
                                      distilled_per_record=s["distilled_per_record"], progress=False)
        shape, recipe = _safety_recipe(args.targets, steps)
        train_lora(fine, records, correction, shape=shape, recipe=recipe,
                   options=RunOptions(seed=s["seed"], progress=False))
    train_s = time.perf_counter() - t0
    results = []
    for w_f, w_c, model in _weighted_points(args, zoo, root, correction, "corrected"):
        results.append({"probe": "correction", "correction": str(correction), "targets": args.targets or "task LoRA's",
                        "steps": steps, "replay": len(replay), "train_s": round(train_s, 1),
                        "w_f": w_f, "w_c": w_c,
                        **_rates(model, None, zoo.data, model / "probe-evals", args.external, args.split)})
    return results


def _module_selected(module: str, selector: str) -> bool:
    """``selector``: ``all``, a layer range ``L0-9`` or a projection ``q_proj``; ``&`` joins terms that must all hold,
    ``+`` joins alternatives (``L20-29&q_proj+L0-4``)."""
    def term(t: str) -> bool:
        if t == "all":
            return True
        if t.startswith("L"):
            lo, hi = (int(x) for x in t[1:].split("-"))
            layer = layer_index(f"{module}.weight")
            return layer is not None and lo <= layer <= hi
        return t in module

    return any(all(term(t) for t in alt.split("&")) for alt in selector.split("+"))


def _layers_probe(args: argparse.Namespace, zoo: Any, root: Path) -> list[dict[str, Any]]:
    """Where harm and skill live: SafeMERGE's α ΔW_f + (1−α) ΔW_s (the zoo's safety LoRA, or the variant the safety
    options name) on the modules a selector picks, ΔW_f elsewhere. One result per ``SELECTOR@ALPHA`` point of
    ``--select`` (e.g. ``L0-9@0.2,q_proj@0.2``); ``SELECTOR@ALPHA:W_S`` weighs ΔW_s by W_S instead of 1 − α."""
    from safemerge.io.adapter import load_adapter

    safety = _safety_variant(zoo, root, args)
    results = []
    for point in args.select.split(","):
        selector, weights = point.rsplit("@", 1)
        a, w_s = (float(x) for x in weights.split(":")) if ":" in weights else (float(weights), 1.0 - float(weights))
        picked = [m for m in load_adapter(zoo.task) if _module_selected(m, selector)]
        key = (zoo.task.name, safety.name, selector, a) + ((w_s,) if ":" in weights else ())
        model = _weighted_model(
            zoo.aligned,
            [(zoo.task, lambda m: a if _module_selected(m, selector) else 1.0),
             (safety, lambda m: w_s if _module_selected(m, selector) else 0.0)],
            root / f"layers-{fingerprint(*key)}")
        results.append({"probe": "layers", "safety": str(safety), "selector": selector, "alpha": a, "w_s": w_s,
                        "modules": len(picked),
                        **_rates(model, None, zoo.data, model / "probe-evals", args.external, args.split)})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("probe", choices=("aligned", "erosion", "safety", "correction", "layers"))
    ap.add_argument("--select", default="all@0.8", help="layers: comma-separated SELECTOR@ALPHA points")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--lookalike-framed-refusals", type=int, default=1, help="aligned: extra refusals per goal")
    ap.add_argument("--steps", type=int, default=None, help="aligned / safety: training steps (default: the demo's)")
    ap.add_argument("--targets", default=None,
                    help="safety / layers: LoRA targets (default: the task LoRA's), e.g. all-linear")
    ap.add_argument("--distilled-per-record", type=int, default=None,
                    help="safety: self-distilled answers kept per safety record (default: the demo's)")
    ap.add_argument("--unlikelihood", type=float, default=None,
                    help="safety / layers: weight of the unlikelihood term on refusal openings (default: the demo's)")
    ap.add_argument("--weights", default="0.8:0.2", help="safety: comma-separated w_f:w_s points")
    ap.add_argument("--replay", type=int, default=0, help="correction: task-training records mixed in")
    ap.add_argument("--lr", type=float, default=None, help="erosion: task-LoRA learning rate (default: the demo's)")
    ap.add_argument("--aligned", type=Path, default=None, help="erosion: aligned model (default: the zoo's)")
    ap.add_argument("--external", type=Path, default=None, help="directory with Bianchi malicious + XSTest")
    ap.add_argument("--split", choices=("val", "eval"), default="val",
                    help="the sets measured: validation (default) or the demo's test sets (to confirm a choice)")
    ap.add_argument("-o", "--out", type=Path, default=Path("bench/results/recipe_probe.jsonl"))
    args = ap.parse_args()

    from safemerge.demo import zoo as Z
    zoo = Z.build_smollm2_zoo(args.cache_dir, log=print)
    root = cache_root(args.cache_dir) / "bench-recipe-probe"
    t0 = time.perf_counter()
    probes = {"safety": _safety_probe, "correction": _correction_probe, "layers": _layers_probe}
    if args.probe in probes:
        _write(probes[args.probe](args, zoo, root), args.out)
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
              **_rates(model, adapter, zoo.data, (adapter or model) / "probe-evals", args.external, args.split)}
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
