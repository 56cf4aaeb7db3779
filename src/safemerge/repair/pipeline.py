"""``safemerge repair``: from a fine-tune that lost its safety to a repaired one, in one command.

The steps, each cached under the work directory so that a rerun redoes nothing:

1. **Task adapter.** A PEFT LoRA adapter is used as is; a full fine-tune is first turned into one
   by :func:`safemerge.extract.extract_lora` (truncated SVD of ``W_ft − W_aligned``).
2. **Safety LoRA** ``ΔW_s``: ``--safety`` if given, else :func:`safemerge.train.safety_lora.train_safety_lora`
   (the ``safety-lora`` command's recipe and corpus) on the aligned model with the task adapter's rank and
   targets (SafeMERGE, Djuhera et al. 2025, §3).
3. **Scan and tune.** :func:`safemerge.autotune.autotune` scans ρ_i = cos(C_i ΔW_f,i, ΔW_f,i)
   (SafeLoRA, Hsu et al. 2024, Eq. 2) once and picks (τ, α) on *validation* sets — built-in
   held-out harmful requests and look-alikes (or ``--val-harmful`` / ``--val-benign``) and the user's
   ``--utility`` set — as ``max utility s.t. harmful ≤ aligned + margin and over-refusal ≤ aligned + margin``.
4. **Write** the SafeMERGE result (layer i → α ΔW_f + (1−α) ΔW_s where ρ_i < τ) as an adapter, or a
   full model with ``merge_into``; before it is renamed into place it is evaluated on the *test*
   sets, and the before/after table (aligned, fine-tuned, repaired: harmful rate, over-refusal,
   utility, each with a 95% bootstrap interval) goes into its model card and ``repair.json``.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safemerge.autotune import DEFAULT_HARM_MARGIN, DEFAULT_REFUSAL_MARGIN
from safemerge.errors import SafemergeError
from safemerge.evaluate.report import ModelRow
from safemerge.options import RunOptions, or_default

Log = Callable[[str], None]
DEFAULT_EXTRACT_RANK = 64
AUTOTUNE_FILES = ("autotune.json", "autotune.png", "tau_sweep.png")


@dataclass
class RepairResult:
    """What :func:`repair` built, chose and measured."""

    out: Path
    output: str
    tau: float
    alpha: float
    task_adapter: Path
    safety: Path
    extracted: bool
    trained_safety: bool
    rows: list[ModelRow]
    autotune: Any
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
    from safemerge.evaluate.generate import fingerprint_path

    return None if path is None else fingerprint_path(Path(str(path)).expanduser())


def _is_adapter(path: str | Path) -> bool:
    return (Path(str(path)) / "adapter_config.json").exists()


def repair(
    finetuned: str | Path,
    *,
    base: str | Path,
    aligned: str | Path,
    out: str | Path,
    utility: Any,
    safety: str | Path | None = None,
    safety_data: str | Path | None = None,
    val_harmful: Any = None,
    val_benign: Any = None,
    test_harmful: Any = "builtin:harmful",
    test_benign: Any = "builtin:benign",
    test_utility: Any = None,
    merge_into: str | Path | None = None,
    extract_rank: int = DEFAULT_EXTRACT_RANK,
    safety_steps: int | None = None,
    safety_lr: float | None = None,
    harm_margin: float = DEFAULT_HARM_MARGIN,
    refusal_margin: float = DEFAULT_REFUSAL_MARGIN,
    judge: str = "keyword",
    max_new_tokens: Mapping[str, int] | None = None,
    grid: Mapping[str, Any] | None = None,
    work_dir: str | Path | None = None,
    options: RunOptions | None = None,
    log: Log | None = None,
) -> RepairResult:
    """Repair the safety of ``finetuned`` (a LoRA adapter on ``aligned`` or a full fine-tune of it).

    Args:
        finetuned: the task LoRA adapter, or a fully fine-tuned model directory.
        base, aligned: the unaligned base and the aligned model (safety subspace V = W_aligned − W_base).
        out: output directory — the repaired adapter, or a full model with ``merge_into``.
        utility: the user's utility validation set (prompt-set spec or records), used to tune α/τ.
        safety: an existing safety LoRA; otherwise one is trained (``safety_data`` or the built-in data).
        val_harmful: harmful validation prompts (default: the built-in held-out requests).
        val_benign: benign look-alike validation prompts (default: the built-in held-out look-alikes); the
            τ/α rule keeps over-refusal within ``refusal_margin`` of the aligned model's.
        test_harmful, test_benign, test_utility: the before/after test sets (keep them disjoint from
            validation); without ``test_utility`` the utility column is measured on ``utility`` and
            labelled as the validation set.
        extract_rank: ``--max-rank`` of the extraction of a full fine-tune.
        safety_steps, safety_lr: override the safety LoRA recipe's steps / learning rate.
        harm_margin: allowed validation harmful-rate excess over the aligned model (0.03 = 3 points).
        refusal_margin: allowed validation over-refusal excess over the aligned model (0.05 = 5 points).
        max_new_tokens: per-suite generation budgets (``{"harmful": 48, …}``).
        grid: the τ/α search of :func:`safemerge.autotune.autotune` (``alphas``, ``max_taus``, ``screen``,
            ``finalists``, ``extensions``); its defaults where absent.
        work_dir: cache (default ``<cache>/repair/<hash of the inputs>``).
        options: ``force`` (replace ``out``), ``allow_pickle`` (inputs), ``progress`` (bars while training and
            generating).
    """
    from safemerge.autotune import autotune
    from safemerge.io.hub import resolve_local
    from safemerge.io.output import check_output_path

    options = or_default(options)
    progress = options.progress
    say = log or (lambda _m: None)
    check_output_path(out, force=options.force, inputs=(finetuned, base, aligned, safety, merge_into))
    finetuned, base, aligned = (resolve_local(p, options=options) for p in (finetuned, base, aligned))
    safety, merge_into = (None if p is None else resolve_local(p, options=options) for p in (safety, merge_into))
    if utility is None:
        raise SafemergeError("repair needs a utility validation set",
                             "pass --utility SET (e.g. a held-out slice of your task data)")
    if not Path(str(finetuned)).exists():
        raise SafemergeError(f"fine-tuned path {str(finetuned)!r} does not exist",
                             "pass a LoRA adapter or a fine-tuned model directory")
    work = _work_dir(work_dir, finetuned, base, aligned, safety, safety_data, val_harmful, val_benign, utility,
                     extract_rank, safety_steps, safety_lr, _grid(grid))
    extracted = not _is_adapter(finetuned)
    task = _task_adapter(finetuned, aligned, work, extract_rank, options, say)
    recipe = {k: v for k, v in (("steps", safety_steps), ("lr", safety_lr)) if v is not None}
    safety_dir, trained = _safety_adapter(safety, aligned, task, work, safety_data, recipe, progress, say)

    val_sets = {"harmful": val_harmful if val_harmful is not None else "builtin:harmful-val",
                "benign": val_benign if val_benign is not None else "builtin:benign-val",
                "utility": utility}
    tests = {"harmful": test_harmful, "benign": test_benign,
             "utility": test_utility if test_utility is not None else utility}
    say("repair: tuning τ and α on the validation sets")
    tuned = autotune(base=base, aligned=aligned, finetuned=task, safety=safety_dir, val_harmful=val_sets["harmful"],
                     val_utility=val_sets["utility"], val_benign=val_sets["benign"], work_dir=work / "autotune",
                     harm_margin=harm_margin, refusal_margin=refusal_margin, judge=judge,
                     max_new_tokens=max_new_tokens, log=say, progress=progress, **_grid(grid))

    def ev(name: str, model: str | Path, adapter: str | Path | None) -> dict[str, Any]:
        from safemerge.autotune import evaluate_suites

        return evaluate_suites(model, adapter=adapter, suites=tests, max_new_tokens=max_new_tokens,
                               out_dir=work / "test" / name, judge=judge, progress=progress)

    say("repair: evaluating the aligned and fine-tuned models on the test sets")
    ft_where = (str(finetuned), None) if extracted else (str(aligned), str(finetuned))
    before = [ModelRow("aligned", "the aligned model", str(aligned), None, ev("aligned", aligned, None)),
              ModelRow("fine-tuned", "full fine-tune" if extracted else "aligned + task LoRA", *ft_where,
                       ev("finetuned", *ft_where))]
    result = RepairResult(out=Path(out), output="model" if merge_into is not None else "adapter", tau=tuned.tau,
                          alpha=tuned.alpha, task_adapter=task, safety=safety_dir, extracted=extracted,
                          trained_safety=trained, rows=list(before), autotune=tuned, merge=None, work_dir=work,
                          test_sets=tests)

    def evaluate_output(tmp: Path) -> tuple[Any, str]:
        """SafeMERGE's ``evaluate`` hook: test the finished output before it is renamed into place."""
        say("repair: evaluating the repaired model on the test sets")
        model, adapter = (tmp, None) if merge_into is not None else (aligned, tmp)
        res = ev("repaired", model, adapter)
        final = (str(out), None) if merge_into is not None else (str(aligned), str(out))  # where it is once renamed
        result.rows = [*before, ModelRow("repaired", f"SafeMERGE {tuned.describe()}", *final, res)]
        for name in AUTOTUNE_FILES:
            if (tuned.work_dir / name).exists():
                shutil.copy2(tuned.work_dir / name, tmp / name)
        (tmp / "repair.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return res, report_markdown(result.rows, tuned, utility_is_validation=test_utility is None,
                                    extracted=extracted, trained_safety=trained)

    from safemerge.safety.api import safemerge_adapters

    say(f"repair: writing {out} ({tuned.describe()})")
    result.merge = safemerge_adapters(base=base, aligned=aligned, finetuned=task, safety=safety_dir, out=out,
                                      merge_into=merge_into, options=options, evaluate=evaluate_output,
                                      **tuned.merge_kwargs())
    return result


GRID_KEYS = ("alphas", "max_taus", "screen", "finalists", "extensions")


def _grid(grid: Mapping[str, Any] | None) -> dict[str, Any]:
    """The τ/α search settings passed on to autotune; an unknown key is a programming error."""
    unknown = set(grid or {}) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown τ/α grid settings {sorted(unknown)}; known: {', '.join(GRID_KEYS)}")
    return dict(grid or {})


def _work_dir(work_dir: str | Path | None, *parts: Any) -> Path:
    from safemerge.demo.zoo import cache_root, fingerprint

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
    from safemerge.extract import extract_lora

    out = work / f"extracted-r{extract_rank}"
    if out.exists():
        say(f"[cached] task LoRA extracted from the full fine-tune: {out}")
        return out
    say(f"repair: extracting a rank-≤{extract_rank} LoRA from the full fine-tune {finetuned}")
    res = extract_lora(finetuned, aligned, out, max_rank=extract_rank, options=options)
    say(f"repair: extracted {len(res.lora)} modules, max relative error {res.max_relative_error:.3e}")
    return out


def _safety_adapter(safety: str | Path | None, aligned: str | Path, task: Path, work: Path, data: Any,
                    recipe: dict[str, Any], progress: bool, say: Log) -> tuple[Path, bool]:
    """``(safety LoRA, trained here?)``: the given one, or one trained with the task adapter's shape (cached)."""
    if safety is not None:
        return Path(str(safety)), False
    from safemerge.train.safety_lora import train_safety_lora

    out = work / "safety-lora"
    if out.exists():
        say(f"[cached] safety LoRA: {out}")
        return out, True
    say("repair: training a safety LoRA with the task adapter's rank and targets "
        f"({'the built-in safety corpus' if data is None else data})")
    # repair evaluates the final model on its test sets; the safety LoRA's own evaluation is safety-lora's job
    train_safety_lora(aligned, task, out, data=data, evaluate=False, options=RunOptions(progress=progress), **recipe)
    return out, True


def report_markdown(rows: list[ModelRow], tuned: Any, *, utility_is_validation: bool, extracted: bool,
                    trained_safety: bool) -> str:
    """The model-card section: before/after table with 95% intervals, the choice and its rule, the Pareto front."""
    from safemerge.autotune import pareto_table, rule_text

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
