"""The safety LoRA of SafeMERGE: a LoRA on the aligned model, shaped like the task LoRA, trained on safety data.

SafeMERGE (Djuhera et al. 2025, §3–4) merges a layer as ``α ΔW_f + (1−α) ΔW_s`` where ``ΔW_s`` is a
*safety LoRA*: a LoRA with the task LoRA's rank and target modules, trained on the aligned model with
safety data (harmful requests answered with refusals). The paper's safety model is a real safety
model — alone it is 1.3–6.3 % harmful. A safety LoRA trained on refusals the aligned model already
produces learns nothing (issue 17 measured loss 0.274 → 0.280: ``ΔW_s`` was optimiser noise), so
the default data (:func:`safemerge.data.safety_corpus.safety_lora_records`) use refusals that explain
the reason and offer a safe alternative, in wordings unlike any SFT's templates, mixed with helpful
answers to benign look-alikes (Bianchi et al. 2024: safety data alone teaches over-refusal).

:func:`train_safety_lora` trains it with :func:`safemerge.train.lora.train_lora` and, unless told not
to, measures the aligned model and ``aligned + ΔW_s`` on harmful and benign look-alike prompts, so
its model card states whether the safety LoRA alone is at least as safe as the aligned model with no
more over-refusal (the issue's target).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError
from safemerge.evaluate.records import PromptSets
from safemerge.options import RunOptions, or_default
from safemerge.train.data import SFTRecord
from safemerge.train.recipe import LoraShape, TrainingRecipe

# Measured on SmolLM2-135M-Instruct with the project corpus (docs/demo.md, "Safety LoRA"): r and targets come
# from the task adapter; these are the rest of the recipe.
SAFETY_STEPS, SAFETY_LR, SAFETY_BATCH, SAFETY_MAX_LENGTH = 60, 1e-3, 8, 128
# The unlikelihood term (``unlikelihood_weight``) stays off: the look-alike answers below are the aligned model's own,
# so they carry almost no gradient and cannot hold the refusal update back; the term pushes the opening words of a
# refusal down after every look-alike prompt instead (see :func:`rejected_refusals`), but no weight measured made the
# safety LoRA alone at least as safe as the aligned model with no more over-refusal (docs/training.md).
SAFETY_RECIPE = TrainingRecipe(steps=SAFETY_STEPS, lr=SAFETY_LR, batch_size=SAFETY_BATCH, max_length=SAFETY_MAX_LENGTH,
                               unlikelihood_weight=0.0)
# At most this many self-distilled look-alike answers per record of the safety data. A well-calibrated aligned model
# answers most look-alikes, and uncapped its answers outnumbered the refusals 2.5 : 1 (522 of 730 records): the
# demo's safety LoRA then learnt helpfulness more than refusal and alone was *less* safe than the aligned model
# (24.6% vs 20.0% harmful, eighth demo run, docs/demo.md). One answer per record keeps the two sides even. Two per
# record over-refuse less alone (validation 14.8% vs 24.8%; aligned 10.8%) but the update refuses less where SafeMERGE
# merges it, and the demo's repair lost most of the skill to meet the harm limit (nineteenth session, docs/demo.md).
DISTILLED_PER_RECORD = 1
# Refusal openings of chat models (SmolLM2's own among them), made unlikely beside the training data's own.
GENERIC_REFUSAL_OPENINGS = ("I'm sorry, but I can't help with that.", "I'm sorry, but I cannot assist with that.",
                            "I can't help with that.", "I cannot help with that request.")
# The stand-alone evaluation of the card: harmful requests and benign look-alikes (disjoint from the default data).
CARD_SETS = PromptSets(harmful="builtin:harmful", benign="builtin:benign")
SUMMARY = "safety_lora.json"
EVAL_MAX_NEW_TOKENS = 32  # a refusal shows in the first sentence (keyword judge)
LOSS_CURVE_POINTS = 10


@dataclass
class SafetyLoraResult:
    """What :func:`train_safety_lora` wrote and measured."""

    out: Path
    rank: int
    alpha: float
    targets: list[str] | str
    losses: list[float]
    evaluation: dict[str, Any] = field(default_factory=dict)
    n_records: dict[str, int] = field(default_factory=dict)  # "data" (corpus or --data), "distilled", "rejected"

    @property
    def target_met(self) -> bool | None:
        """aligned + ΔW_s at most as harmful as aligned, with no more over-refusal (``None``: not evaluated)."""
        if not self.evaluation:
            return None
        al, s = self.evaluation["aligned"], self.evaluation["safety"]
        return s["harmful_rate"] <= al["harmful_rate"] and s["over_refusal_rate"] <= al["over_refusal_rate"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["target_met"] = str(self.out), self.target_met
        return d


def like_adapter_shape(like: str | Path) -> LoraShape:
    """The shape (``r``, ``lora_alpha``, ``target_modules``) of the PEFT LoRA adapter ``like`` (the task LoRA)."""
    from safemerge.io.adapter import load_adapter

    adapter = load_adapter(like)
    targets = adapter.config.get("target_modules")
    if not targets:
        raise SafemergeError(
            f"{like}: adapter_config.json names no target_modules",
            "pass the task LoRA written by PEFT / safemerge train-lora as --like",
        )
    if not isinstance(targets, str):
        targets = sorted(str(t) for t in targets)
    return LoraShape(rank=adapter.r, alpha=adapter.lora_alpha, targets=targets)


def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> list[tuple[int, float]]:
    """``(last step, mean loss)`` over ``points`` equal windows of the run — the curve the card reports."""
    n = len(losses)
    if n == 0:
        return []
    k = min(points, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i + 1], sum(losses[bounds[i] : bounds[i + 1]]) / (bounds[i + 1] - bounds[i])) for i in range(k)]


def train_safety_lora(
    aligned: str | Path,
    like: str | Path,
    out: str | Path,
    *,
    data: str | Path | Iterable[Any] | None = None,
    recipe: TrainingRecipe = SAFETY_RECIPE,
    sets: PromptSets = CARD_SETS,
    evaluate: bool = True,
    limit: int | None = None,
    distill_benign: bool = True,
    distilled_per_record: int = DISTILLED_PER_RECORD,
    options: RunOptions | None = None,
) -> SafetyLoraResult:
    """Train SafeMERGE's safety LoRA on ``aligned`` with the rank and targets of ``like``.

    Args:
        aligned: the aligned model directory (the task LoRA's base).
        like: the task LoRA adapter whose ``r``, ``lora_alpha`` and ``target_modules`` are copied
            (:func:`like_adapter_shape`).
        out: output adapter directory, written atomically (temporary sibling renamed into place).
        data: training records (JSONL/JSON file or records); default: the project's safety corpus.
        recipe: the :func:`~safemerge.train.lora.train_lora` optimisation (default :data:`SAFETY_RECIPE`;
            ``precision`` ``None``: float32, ``auto``: bf16 where native); its ``unlikelihood_weight`` > 0 adds the
            unlikelihood term on refusal openings after look-alike prompts (:func:`rejected_refusals`).
        sets: the ``harmful`` and ``benign`` prompt sets of the card's evaluation (disjoint from the default data).
        evaluate: measure aligned and aligned + ΔW_s (harmful rate, over-refusal) for the card.
        limit: evaluate at most ``limit`` prompts per set.
        distill_benign: add the aligned model's own helpful answers to the shipped look-alike prompts
            (:func:`~safemerge.data.safety_corpus.benign_distill_prompts`; refusals and loops dropped,
            :func:`~safemerge.train.distill.self_distill`), so the safety LoRA learns to refuse harm
            without learning to refuse what the aligned model answers.
        distilled_per_record: keep at most this many self-distilled answers per record of the safety data (a
            seeded sample over all look-alike goals; default :data:`DISTILLED_PER_RECORD`).
        options: ``seed`` (the recipe's: LoRA initialisation, data order, corpus sampling), ``force`` (replace
            ``out``), ``progress``.

    Returns:
        :class:`SafetyLoraResult`; ``out`` holds the adapter, ``training_log.json``,
        ``safety_lora.json`` (loss curve, evaluation) and a model card reporting both.
    """
    from safemerge.io.output import atomic_output, check_output_path
    from safemerge.train.lora import TRAINING_LOG

    options = or_default(options)
    shape = like_adapter_shape(like)
    check_output_path(out, force=options.force)
    records, n_distilled = training_records(aligned, data, seed=options.seed, distill_benign=distill_benign,
                                            distilled_per_record=distilled_per_record, progress=options.progress)
    with atomic_output(out, force=options.force) as tmp:
        trained = tmp / "adapter"
        # the adapter goes into the fresh temporary directory
        rejected = fit_safety_adapter(aligned, records, trained, shape=shape, recipe=recipe,
                                      distill_benign=distill_benign, options=options.replace(force=False))
        for f in trained.iterdir():
            shutil.move(str(f), tmp / f.name)
        trained.rmdir()
        losses = json.loads((tmp / TRAINING_LOG).read_text())["losses"]
        result = SafetyLoraResult(out=Path(out), rank=shape.rank, alpha=shape.alpha, targets=shape.targets,
                                  losses=losses, n_records={"data": len(records) - n_distilled,
                                                            "distilled": n_distilled, "rejected": len(rejected)})
        if evaluate:
            result.evaluation = _evaluate_alone(aligned, tmp, sets=sets, limit=limit, progress=options.progress)
        (tmp / SUMMARY).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        _append_card(tmp, result, like=like)
    return result


def fit_safety_adapter(
    aligned: str | Path,
    records: list[SFTRecord],
    out: str | Path,
    *,
    shape: LoraShape,
    recipe: TrainingRecipe,
    distill_benign: bool,
    options: RunOptions,
) -> list[dict[str, str]]:
    """Train the safety LoRA's adapter on ``records`` into ``out`` (:func:`~safemerge.train.lora.train_lora`), with
    the unlikelihood term on refusal openings after look-alikes when ``recipe.unlikelihood_weight`` > 0
    (:func:`rejected_refusals`).

    Returns the rejected (prompt, refusal opening) pairs the term used (empty when it is off).
    """
    from safemerge.train.lora import train_lora

    use = recipe.unlikelihood_weight > 0
    rejected = rejected_refusals(records, seed=options.seed, distill_benign=distill_benign) if use else []
    train_lora(aligned, records, out, shape=shape, recipe=recipe, rejected=rejected or None, options=options)
    return rejected


def training_records(
    aligned: str | Path,
    data: str | Path | Iterable[Any] | None,
    *,
    seed: int = 0,
    distill_benign: bool = True,
    distilled_per_record: int = DISTILLED_PER_RECORD,
    progress: bool = True,
) -> tuple[list[SFTRecord], int]:
    """The safety LoRA's training set: ``data`` (default: the shipped corpus) + self-distilled look-alike answers,
    at most ``distilled_per_record`` per record of ``data``.

    Returns the records and how many of them are self-distilled.
    """
    from safemerge.data.safety_corpus import benign_distill_prompts, safety_lora_records
    from safemerge.train.data import load_sft_records

    records = load_sft_records(safety_lora_records(seed=seed) if data is None else data)
    if not distill_benign:
        return records, 0
    from safemerge.train.distill import self_distill

    distilled = self_distill(aligned, benign_distill_prompts(seed=seed), options=RunOptions(progress=progress))
    keep = min(len(distilled), distilled_per_record * len(records))  # a seeded sample over all look-alike goals
    distilled = [distilled[i] for i in sorted(random.Random(f"safety-lora-distilled-{seed}").sample(
        range(len(distilled)), keep))]
    return records + load_sft_records(distilled) if distilled else records, len(distilled)


def rejected_refusals(records: list[SFTRecord], *, seed: int = 0, distill_benign: bool = True) -> list[dict[str, str]]:
    """Refusal openings to make unlikely after benign look-alikes: one per look-alike prompt.

    The look-alikes are the prompts of the training records the keyword judge reads as answered (not refused) and,
    with ``distill_benign``, every shipped look-alike prompt of the self-distillation — those whose aligned answer
    was dropped as a refusal included, the very prompts the aligned model over-refuses. Each gets the first sentence
    of one of the training refusals, or one of :data:`GENERIC_REFUSAL_OPENINGS` (a seeded choice), as the answer
    *not* to give.
    """
    from safemerge.data.safety_corpus import benign_distill_prompts
    from safemerge.evaluate.judges import KeywordJudge

    judge = KeywordJudge()
    refused = [judge.is_refusal(r.response) for r in records]
    if not any(refused):
        raise SafemergeError("the safety data hold no refusal to contrast with the look-alikes",
                             "add harmful prompts answered with refusals, or pass --unlikelihood 0")
    openings = sorted({_first_sentence(r.response) for r, no in zip(records, refused) if no}
                      | set(GENERIC_REFUSAL_OPENINGS))
    prompts = [r.prompt for r, no in zip(records, refused) if not no]
    prompts += benign_distill_prompts(seed=seed) if distill_benign else []
    rng = random.Random(f"safety-lora-rejected-{seed}")
    return [{"prompt": p, "response": rng.choice(openings)} for p in dict.fromkeys(prompts)]


def _first_sentence(text: str) -> str:
    """``text`` up to and including its first sentence end (``.``, ``!`` or ``?`` followed by a space)."""
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


def _evaluate_alone(aligned: str | Path, adapter: Path, *, sets: PromptSets, limit: int | None,
                    progress: bool) -> dict[str, Any]:
    """Harmful rate and over-refusal of the aligned model and of aligned + ΔW_s, with 95 % intervals."""
    from safemerge.evaluate.datasets import load_prompts
    from safemerge.evaluate.suites import evaluate_suites

    full = sets.filled(CARD_SETS)
    harmful, benign = full.harmful, full.benign
    suites = {"harmful": load_prompts(str(harmful), limit=limit), "benign": load_prompts(str(benign), limit=limit)}
    budget = {"harmful": EVAL_MAX_NEW_TOKENS, "benign": EVAL_MAX_NEW_TOKENS}
    out: dict[str, Any] = {"sets": {"harmful": str(harmful), "benign": str(benign)}, "max_new_tokens": budget}
    for name, lora in (("aligned", None), ("safety", adapter)):
        res = evaluate_suites(
            aligned,
            adapter=lora,
            suites=suites,
            max_new_tokens=budget,
            out_dir=adapter / "eval" / name,
            progress=progress,
        )
        out[name] = {
            "harmful_rate": res["harmful"]["harmful_rate"],
            "harmful_ci": res["harmful"]["ci"],
            "over_refusal_rate": res["benign"]["over_refusal_rate"],
            "over_refusal_ci": res["benign"]["ci"],
            "n": {"harmful": res["harmful"]["n"], "benign": res["benign"]["n"]},
        }
    return out


def _pct(x: float, ci: list[float] | None) -> str:
    return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" if ci else "")


def _append_card(tmp: Path, result: SafetyLoraResult, *, like: str | Path) -> None:
    """Add the safety LoRA's loss curve and stand-alone evaluation to the card ``train_lora`` wrote."""
    from safemerge.io.output import md_escape

    curve = "\n".join(f"| {step} | {loss:.4f} |" for step, loss in loss_curve(result.losses))
    text = [
        "",
        "## Safety LoRA",
        "",
        f"SafeMERGE's safety LoRA (Djuhera et al. 2025): rank {result.rank}, lora_alpha {result.alpha:g} and "
        f"targets `{md_escape(result.targets)}` copied from `{md_escape(Path(like).name)}`. Training records: "
        f"{result.n_records.get('data', 0)} safety records + {result.n_records.get('distilled', 0)} look-alike answers "
        "self-distilled from the aligned model (refusals and loops dropped)."
        + (f" Unlikelihood term: the opening words of a refusal made unlikely after {result.n_records['rejected']} "
           "look-alike prompts (Welleck et al. 2020, Eq. 4; per-step values in `training_log.json`)."
           if result.n_records.get("rejected") else ""),
        "",
        "Loss curve (mean answer-token cross-entropy per window of steps):",
        "",
        "| up to step | mean loss |",
        "|---|---|",
        curve,
        "",
    ]
    ev = result.evaluation
    if ev:
        text += [
            "## Aligned + ΔW_s alone",
            "",
            f"Harmful: `{md_escape(ev['sets']['harmful'])}`; benign look-alikes: `{md_escape(ev['sets']['benign'])}`; "
            f"keyword judge, {ev['max_new_tokens']['harmful']} new tokens, bfloat16; 95% bootstrap intervals.",
            "",
            "| model | harmful ↓ | over-refusal ↓ |",
            "|---|---|---|",
        ]
        for name, label in (("aligned", "aligned"), ("safety", "aligned + ΔW_s")):
            m = ev[name]
            text.append(
                f"| {label} | {_pct(m['harmful_rate'], m['harmful_ci'])} | "
                f"{_pct(m['over_refusal_rate'], m['over_refusal_ci'])} |"
            )
        verdict = "met" if result.target_met else "not met"
        text += ["", f"Target (at least as safe as the aligned model, no more over-refusal): **{verdict}**.", ""]
    card = tmp / "README.md"
    card.write_text(card.read_text().rstrip() + "\n" + "\n".join(text))
