"""``safemerge repair``: from a fine-tune that lost its safety to a repaired one, in one command.

The steps, each cached under the work directory so that a rerun redoes nothing:

1. **Task adapter.** A PEFT LoRA adapter is used as is; a full fine-tune is first turned into one
   by :func:`safemerge.extract.extract_lora` (truncated SVD of ``W_ft − W_aligned``).
2. **Safety LoRA** ``ΔW_s``: ``--safety`` if given, else :func:`safemerge.train.safety_lora.train_safety_lora`
   (the ``safety-lora`` command's recipe and corpus) on the aligned model with the task adapter's rank and
   targets (SafeMERGE, Djuhera et al. 2025, §3).
3. **Scan and tune.** :func:`safemerge.tuning.search.autotune` scans ρ_i = cos(C_i ΔW_f,i, ΔW_f,i)
   (SafeLoRA, Hsu et al. 2024, Eq. 2) once and picks (τ, α) on *validation* sets — built-in
   held-out harmful requests and look-alikes (or ``--val-harmful`` / ``--val-benign``) and the user's
   ``--utility`` set — as ``max utility s.t. harmful ≤ aligned + margin and over-refusal ≤ aligned + margin``.
4. **Write** the SafeMERGE result (layer i → α ΔW_f + (1−α) ΔW_s where ρ_i < τ) as an adapter, or a
   full model with ``merge_into``; before it is renamed into place it is evaluated on the *test*
   sets, and the before/after table (aligned, fine-tuned, repaired: harmful rate, over-refusal,
   utility, each with a 95% bootstrap interval) goes into its model card and ``repair.json``.
"""
from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safemerge.cache import cache_root, fingerprint
from safemerge.errors import SafemergeError
from safemerge.evaluate.generate import fingerprint_path
from safemerge.evaluate.records import PromptSets
from safemerge.evaluate.report import ModelRow
from safemerge.evaluate.suites import SuiteSettings, evaluate_suites
from safemerge.extract import extract_lora
from safemerge.io.hub import resolve_local
from safemerge.io.output import check_output_path
from safemerge.options import RunOptions, or_default
from safemerge.safety.api import safemerge_adapters
from safemerge.safety.settings import SafeMergeModels
from safemerge.train.recipe import TrainingRecipe
from safemerge.train.safety_lora import SAFETY_RECIPE, train_safety_lora
from safemerge.tuning.grid import SearchSettings
from safemerge.tuning.report import pareto_table, rule_text
from safemerge.tuning.result import AutotuneResult
from safemerge.tuning.search import autotune

Log = Callable[[str], None]
DEFAULT_EXTRACT_RANK = 64
AUTOTUNE_FILES = ("autotune.json", "autotune.png", "tau_sweep.png")
VALIDATION_DEFAULTS = PromptSets(harmful="builtin:harmful-val", benign="builtin:benign-val")
TEST_DEFAULTS = ("builtin:harmful", "builtin:benign")  # harmful, benign; utility: the validation set, labelled


@dataclass
class RepairResult:
    """What :func:`repair` built, chose and measured."""

    out: Path
    output: str
    task_adapter: Path
    safety: Path
    extracted: bool
    trained_safety: bool
    rows: list[ModelRow]
    autotune: AutotuneResult
    merge: Any
    work_dir: Path
    test_sets: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "safemerge-repair", "output": self.output, **self.autotune.merge_kwargs(),
                "task_adapter": str(self.task_adapter), "extracted_from_full_finetune": self.extracted,
                "safety": str(self.safety), "trained_safety_lora": self.trained_safety,
                "test_sets": {k: _spec_name(v) for k, v in self.test_sets.items()},
                "rows": [r.to_dict() for r in self.rows], "merged_layers": len(self.autotune.chosen.merged),
                "autotune": {"rule": "max validation utility s.t. harmful <= aligned + margin",
                             "harm_margin": self.autotune.harm_margin, "constraint_met": self.autotune.constraint_met}}


def _spec_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else f"{len(spec)} records"


def _fingerprint(path: str | Path | None) -> str | None:
    return None if path is None else fingerprint_path(Path(str(path)).expanduser())


def _is_adapter(path: str | Path) -> bool:
    return (Path(str(path)) / "adapter_config.json").exists()


@dataclass(frozen=True)
class RepairModels:
    """The models :func:`repair` reads.

    Attributes:
        finetuned: the task LoRA adapter, or a fully fine-tuned model directory.
        base, aligned: the unaligned base and the aligned model (safety subspace V = W_aligned − W_base).
        safety: an existing safety LoRA (``None``: one is trained, see :class:`RepairRecipe`).
        merge_into: write a full model, this model + the repaired update (``None``: a PEFT adapter).
    """

    finetuned: str | Path
    base: str | Path
    aligned: str | Path
    safety: str | Path | None = None
    merge_into: str | Path | None = None


@dataclass(frozen=True)
class RepairRecipe:
    """How :func:`repair` builds what it is not given: the rank cap of a LoRA extracted from a full fine-tune
    (``--extract-rank``), and the safety LoRA's data, steps and learning rate (``None``: the built-in corpus and
    the ``safety-lora`` recipe's values)."""

    extract_rank: int = DEFAULT_EXTRACT_RANK
    safety_data: str | Path | None = None
    safety_steps: int | None = None
    safety_lr: float | None = None

    def safety_training(self) -> TrainingRecipe:
        """The safety LoRA's ``train_safety_lora`` recipe: ``safety-lora``'s, with the values set here."""
        given = {k: v for k, v in (("steps", self.safety_steps), ("lr", self.safety_lr)) if v is not None}
        return replace(SAFETY_RECIPE, **given)


def repair(
    models: RepairModels,
    out: str | Path,
    *,
    validation: PromptSets,
    test: PromptSets = PromptSets(),
    recipe: RepairRecipe = RepairRecipe(),
    search: SearchSettings = SearchSettings(),
    settings: SuiteSettings = SuiteSettings(),
    work_dir: str | Path | None = None,
    options: RunOptions | None = None,
    log: Log | None = None,
) -> RepairResult:
    """Repair the safety of ``models.finetuned`` (a LoRA adapter on ``models.aligned`` or a full fine-tune of it).

    Args:
        models: the fine-tune, base and aligned models (+ an existing safety LoRA, a full model to merge into).
        out: output directory — the repaired adapter, or a full model with ``models.merge_into``.
        validation: the sets τ/α are tuned on. ``utility`` (the user's utility validation set) is required;
            ``harmful`` and ``benign`` default to the built-in held-out requests and look-alikes (the τ/α rule
            keeps over-refusal within ``search.refusal_margin`` of the aligned model's).
        test: the before/after test sets (keep them disjoint from validation); ``harmful`` / ``benign`` default
            to ``builtin:harmful`` / ``builtin:benign``; without ``utility`` the utility column is measured on
            the validation utility set and labelled as such.
        recipe: the extraction rank of a full fine-tune and the safety LoRA's data / steps / learning rate.
        search: the τ/α search of :func:`safemerge.tuning.search.autotune` and its margins (0.03 / 0.05).
        settings: judge and per-suite generation budgets (``{"harmful": 48, …}``) of every evaluation.
        work_dir: cache (default ``<cache>/repair/<hash of the inputs>``).
        options: ``force`` (replace ``out``), ``allow_pickle`` (inputs), ``progress`` (bars while training and
            generating).
    """
    options = or_default(options)
    say = log or (lambda _m: None)
    models = _checked_models(models, out, validation, options)
    work = _work_dir(work_dir, models.finetuned, models.base, models.aligned, models.safety, recipe.safety_data,
                     validation.harmful, validation.benign, validation.utility, recipe.extract_rank,
                     recipe.safety_steps, recipe.safety_lr, search.grid_overrides())
    extracted = not _is_adapter(models.finetuned)
    task = _task_adapter(models.finetuned, models.aligned, work, recipe.extract_rank, options, say)
    safety_dir, trained = _safety_adapter(models.safety, models.aligned, task, work, recipe, options.progress, say)

    val_sets = validation.filled(VALIDATION_DEFAULTS)
    tests = test.filled(PromptSets(*TEST_DEFAULTS, utility=validation.utility))
    say("repair: tuning τ and α on the validation sets")
    merged_models = SafeMergeModels(models.base, models.aligned, task, safety_dir)
    tuned = autotune(merged_models, val_sets, work / "autotune",
                     search=search, settings=settings, log=say, progress=options.progress)
    run = _TestRun(tests.as_suites(), settings, work / "test", options.progress)

    say("repair: evaluating the aligned and fine-tuned models on the test sets")
    before = _before_rows(models, run, extracted=extracted)
    result = RepairResult(out=Path(out), output="model" if models.merge_into is not None else "adapter",
                          task_adapter=task, safety=safety_dir, extracted=extracted,
                          trained_safety=trained, rows=list(before), autotune=tuned, merge=None, work_dir=work,
                          test_sets=tests.as_suites())
    evaluate_output = functools.partial(_evaluate_output, out=out, models=models, run=run, before=before,
                                        result=result, utility_is_validation=test.utility is None, say=say)
    say(f"repair: writing {out} ({tuned.describe()})")
    result.merge = safemerge_adapters(merged_models, out, settings=tuned.settings(), merge_into=models.merge_into,
                                      options=options, evaluate=evaluate_output)
    return result


def _checked_models(models: RepairModels, out: str | Path, validation: PromptSets,
                    options: RunOptions) -> RepairModels:
    """``models`` resolved to local paths, after the checks that must fail before any work: the output is not an
    input, a utility validation set is given, the fine-tune exists."""
    check_output_path(out, force=options.force, inputs=(models.finetuned, models.base, models.aligned, models.safety,
                                                       models.merge_into))
    models = _resolved(models, options)
    if validation.utility is None:
        raise SafemergeError("repair needs a utility validation set",
                             "pass --utility SET (e.g. a held-out slice of your task data)")
    if not Path(str(models.finetuned)).exists():
        raise SafemergeError(f"fine-tuned path {str(models.finetuned)!r} does not exist",
                             "pass a LoRA adapter or a fine-tuned model directory")
    return models


def _before_rows(models: RepairModels, run: _TestRun, *, extracted: bool) -> list[ModelRow]:
    """The aligned and the fine-tuned model measured on the test sets (a full fine-tune as itself, a task LoRA on
    the aligned model)."""
    aligned = models.aligned
    ft_where = (str(models.finetuned), None) if extracted else (str(aligned), str(models.finetuned))
    return [ModelRow("aligned", "the aligned model", str(aligned), None, run("aligned", aligned, None)),
            ModelRow("fine-tuned", "full fine-tune" if extracted else "aligned + task LoRA", *ft_where,
                     run("finetuned", *ft_where))]


def _evaluate_output(tmp: Path, *, out: str | Path, models: RepairModels, run: _TestRun, before: list[ModelRow],
                     result: RepairResult, utility_is_validation: bool, say: Log) -> tuple[dict[str, Any], str]:
    """SafeMERGE's ``evaluate`` hook: test the finished output in ``tmp`` before it is renamed into place, add the
    repaired row to ``result``, put ``repair.json`` and the automatic τ/α files next to it; returns the results and
    the model card's report."""
    say("repair: evaluating the repaired model on the test sets")
    tuned, aligned = result.autotune, models.aligned
    full = models.merge_into is not None
    res = run("repaired", *((tmp, None) if full else (aligned, tmp)))  # an adapter's cache rows follow its bytes
    final = (str(out), None) if full else (str(aligned), str(out))  # where it is once renamed
    result.rows = [*before, ModelRow("repaired", f"SafeMERGE {tuned.describe()}", *final, res)]
    for name in AUTOTUNE_FILES:
        if (tuned.work_dir / name).exists():
            shutil.copy2(tuned.work_dir / name, tmp / name)
    (tmp / "repair.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return res, report_markdown(result.rows, tuned, utility_is_validation=utility_is_validation,
                                extracted=result.extracted, trained_safety=result.trained_safety)


def _resolved(models: RepairModels, options: RunOptions) -> RepairModels:
    """``models`` with Hub ids and ``~`` resolved to local paths."""
    def local(p: str | Path | None) -> str | Path | None:
        return None if p is None else resolve_local(p, options=options)

    return RepairModels(*(local(getattr(models, f.name)) for f in fields(RepairModels)))


@dataclass(frozen=True)
class _TestRun:
    """One model on repair's test sets, cached under ``work/<name>``."""

    suites: dict[str, Any]
    settings: SuiteSettings
    work: Path
    progress: bool

    def __call__(self, name: str, model: str | Path, adapter: str | Path | None) -> dict[str, Any]:
        return evaluate_suites(model, adapter=adapter, suites=self.suites, max_new_tokens=self.settings.max_new_tokens,
                               out_dir=self.work / name, judge=self.settings.judge, progress=self.progress)


def _work_dir(work_dir: str | Path | None, *parts: Any) -> Path:
    if work_dir is not None:
        work = Path(work_dir).expanduser().absolute()
    else:
        key = [_fingerprint(p) if isinstance(p, (str, Path)) and Path(str(p)).exists() else p for p in parts]
        work = cache_root() / "repair" / fingerprint(*key)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _task_adapter(finetuned: str | Path, aligned: str | Path, work: Path, extract_rank: int, options: RunOptions,
                  say: Log) -> Path:
    """The task LoRA: ``finetuned`` itself, or its extraction against ``aligned`` (cached in ``work``)."""
    if _is_adapter(finetuned):
        return Path(str(finetuned))
    out = work / f"extracted-r{extract_rank}"
    if out.exists():
        say(f"[cached] task LoRA extracted from the full fine-tune: {out}")
        return out
    say(f"repair: extracting a rank-≤{extract_rank} LoRA from the full fine-tune {finetuned}")
    res = extract_lora(finetuned, aligned, out, max_rank=extract_rank, options=options)
    say(f"repair: extracted {len(res.lora)} modules, max relative error {res.max_relative_error:.3e}")
    return out


def _safety_adapter(safety: str | Path | None, aligned: str | Path, task: Path, work: Path, recipe: RepairRecipe,
                    progress: bool, say: Log) -> tuple[Path, bool]:
    """``(safety LoRA, trained here?)``: the given one, or one trained with the task adapter's shape (cached)."""
    if safety is not None:
        return Path(str(safety)), False
    out = work / "safety-lora"
    if out.exists():
        say(f"[cached] safety LoRA: {out}")
        return out, True
    say("repair: training a safety LoRA with the task adapter's rank and targets "
        f"({'the built-in safety corpus' if recipe.safety_data is None else recipe.safety_data})")
    # repair evaluates the final model on its test sets; the safety LoRA's own evaluation is safety-lora's job
    train_safety_lora(aligned, task, out, data=recipe.safety_data, recipe=recipe.safety_training(), evaluate=False,
                      options=RunOptions(progress=progress))
    return out, True


def report_markdown(rows: list[ModelRow], tuned: AutotuneResult, *, utility_is_validation: bool, extracted: bool,
                    trained_safety: bool) -> str:
    """The model-card section: before/after table with 95% intervals, the choice and its rule, the Pareto front."""
    util = "utility (validation set, used for tuning)" if utility_is_validation else "utility ↑"
    lines = ["## Repair: before / after", "",
             "Test-set rates with 95% bootstrap intervals (τ and α were tuned on separate validation sets).", "",
             f"| model | how | harmful ↓ | over-refusal ↓ | {util} |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.how} | " + " | ".join(r.cells()) + " |")
    c = tuned.chosen
    lines += ["", f"Chosen on validation: {c.describe()} ({len(c.merged)} of {len(tuned.rhos)} layers "
              f"merged), validation harmful {100 * (c.harmful_rate or 0):.1f}%, utility {100 * (c.utility or 0):.1f}%.",
              f"Rule: maximum validation utility subject to {rule_text(tuned)}"
              + ("" if tuned.constraint_met else " — no grid point met it, so the closest point was chosen")
              + ".",
              f"Task adapter: {'extracted from the full fine-tune (truncated SVD)' if extracted else 'as given'}; "
              f"safety LoRA: {'trained by repair' if trained_safety else 'as given'}.",
              "", "Pareto front on validation:", "",
              "| τ | α | merged | harmful | utility | over-refusal |", "|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in pareto_table(tuned)]
    return "\n".join(lines)


def print_report(result: RepairResult, console: Any = None) -> None:
    """The before/after table on stdout (rich)."""

    con = console or Console()
    t = Table(title=f"safemerge repair — test sets, 95% intervals ({result.autotune.describe()})")
    for col in ("model", "how", "harmful ↓", "over-refusal ↓", "utility ↑"):
        t.add_column(col, justify="left" if col in ("model", "how") else "right")
    for r in result.rows:
        t.add_row(r.name, r.how, *r.cells())
    con.print(t)
