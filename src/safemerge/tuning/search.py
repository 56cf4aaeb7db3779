"""The coarse-to-fine τ/α search of automatic τ/α (the rule: :mod:`safemerge.tuning`).

One scan of ρ; every grid point measured on the validation sets by
:func:`safemerge.evaluate.suites.evaluate_suites`, one evaluation per distinct merge; merged adapters,
generations, ``autotune.json`` and the plots under ``work_dir``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError
from safemerge.evaluate.records import PromptSets
from safemerge.evaluate.suites import SuiteSettings, evaluate_suites
from safemerge.io.output import atomic_write_text
from safemerge.safety.api import safemerge_adapters, scan
from safemerge.safety.selection import LayerScore, select_below
from safemerge.safety.settings import SafeMergeModels
from safemerge.tuning.grid import (
    LATE_GAINS,
    LATE_TAU,
    PAPER_TAU,
    SCREENED_SUITES,
    GridPoint,
    SearchSettings,
    late_block_starts,
    neighbours,
    tau_candidates,
)
from safemerge.tuning.pareto import Limits, choose, distinct_leaders, mark_pareto_front
from safemerge.tuning.plots import plot_pareto, plot_tau_sweep
from safemerge.tuning.result import AutotuneResult

Log = Callable[[str], None]
Screen = tuple[int, int, int] | None


def autotune(
    models: SafeMergeModels,
    validation: PromptSets,
    work_dir: str | Path,
    *,
    search: SearchSettings = SearchSettings(),
    settings: SuiteSettings = SuiteSettings(),
    strategy: str = "linear",
    log: Log | None = None,
    progress: bool = False,
) -> AutotuneResult:
    """Pick SafeMERGE's (τ, α) on validation prompts (see :mod:`safemerge.tuning` for the rule).

    Coarse-to-fine search: (1) every τ × every other α of ``search.alphas`` on the first ``search.screen`` =
    ``(n_harmful, n_utility, n_benign)`` validation items; (2) the α neighbours of the ``search.finalists`` best
    screened points, also screened; (3) the ``finalists`` best screened points on the whole
    validation sets, where the rule decides. "Best" on the screen is the rule read optimistically (harmful and
    over-refusal rates one standard error lower, :data:`~safemerge.tuning.pareto.SCREEN_Z`) over distinct merges
    (:func:`~safemerge.tuning.pareto.distinct_leaders`). ``screen=None`` evaluates the whole grid on the whole
    sets. Validation prefixes are reused: a full evaluation regenerates nothing the screen made.

    Args:
        models: base, aligned, task and safety LoRA.
        validation: harmful and utility prompt sets (specs or record lists) — keep them disjoint from the final
            test sets (order them so that prefixes span categories); with a benign look-alike set the rule also
            requires the over-refusal rate to stay within ``search.refusal_margin`` of the aligned model's.
        work_dir: cache for merged adapters, generations, ``autotune.json`` and the plots.
        search: the grid (τ default: :func:`~safemerge.tuning.grid.tau_candidates` of the scanned ρ), the
            screen, the finalists and the margins.
        settings: judge of the harmful suite and per-suite generation budgets of the evaluations.
        strategy: SafeMERGE's combination of the two updates (``linear`` by default).
        progress: show the evaluation harness's generation progress bars (stderr).

    Returns:
        :class:`~safemerge.tuning.result.AutotuneResult`; ``work_dir/autotune.json``, ``autotune.png``
        (Pareto front) and ``tau_sweep.png`` are written.
    """
    if validation.harmful is None or validation.utility is None:
        raise SafemergeError("automatic τ/α needs harmful and utility validation prompts",
                             "pass --val-harmful SET and --val-utility SET (keep them disjoint from your test sets)")
    say = log or (lambda _m: None)
    work = Path(work_dir).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)

    say("autotune: scanning layer similarities once")
    scores = scan(models.base, models.aligned, [models.finetuned], tau=PAPER_TAU)
    rhos = {s.module: float(s.rho) for s in scores}
    taus = list(search.taus) if search.taus else tau_candidates(list(rhos.values()), max_taus=search.max_taus)
    grid = _MeasuredGrid(models, scores, work, strategy=strategy, say=say, evaluate=partial(
        evaluate_suites, models.aligned, suites=validation.as_suites(), max_new_tokens=settings.max_new_tokens,
        judge=settings.judge, batch_size=settings.batch_size, dtype=settings.dtype, progress=progress))
    if grid.aligned["harmful_rate"] is None:
        raise SafemergeError("the validation harmful set is empty", "pass a non-empty --val-harmful set")
    refusal_margin = search.refusal_margin if validation.benign is not None else None
    limits = Limits.around(grid.aligned, search.harm_margin, refusal_margin)

    coarse = search.coarse_alphas()
    say(f"autotune: τ ∈ {taus}; α ∈ {coarse} (coarse) of {list(search.alphas)}; screen {search.screen}, "
        f"{search.finalists} finalists")
    late = late_block_starts(scores) if search.extensions else []
    if late:
        say(f"autotune: late-block extension: blocks ≥ {late}, safety gain {list(LATE_GAINS)}")
    grid.run(taus, coarse, search, limits, late)
    mark_pareto_front(grid.points)
    chosen, ok = choose([p for p in grid.points if p.rung == "full"], limits)
    chosen.chosen = True
    result = AutotuneResult(chosen=chosen, points=grid.points, aligned=grid.aligned, finetuned=grid.finetuned,
                            harm_margin=search.harm_margin, constraint_met=ok, rhos=rhos, work_dir=work,
                            refusal_margin=refusal_margin)
    result.plot = plot_pareto(result, work / "autotune.png")
    result.sweep_plot = plot_tau_sweep(result, work / "tau_sweep.png")
    atomic_write_text(work / "autotune.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _metrics(res: dict[str, Any]) -> dict[str, Any]:
    """Harmful rate, utility, over-refusal (when a benign set ran) and item counts of one validation run."""
    m = {"harmful_rate": res["harmful"]["harmful_rate"], "utility": res["utility"]["accuracy"],
         "over_refusal": None, "n": [res["harmful"]["n"], res["utility"]["n"]]}
    if "benign" in res:
        m["over_refusal"] = res["benign"]["over_refusal_rate"]
        m["n"].append(res["benign"]["n"])
    return m


def _merge_key(merged: Sequence[str], alpha: float, safety_gain: float = 1.0) -> str:
    """The cache name of one merge: the layers it merges, its α and safety gain (two points with the same key are
    one model; the paper's gain 1 keeps the key it always had)."""
    ident: list[Any] = [sorted(merged), round(alpha, 6)] + ([round(safety_gain, 6)] if safety_gain != 1.0 else [])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]


class _MeasuredGrid:
    """The measured (τ, α) points of one :func:`autotune` call: one evaluation per distinct merge (same layers,
    same α), merged adapters and generations cached under ``work``; the aligned and fine-tuned models are
    measured first, on the whole validation sets."""

    def __init__(self, models: SafeMergeModels, scores: Sequence[LayerScore], work: Path, *, strategy: str,
                 evaluate: Callable[..., dict[str, Any]], say: Log) -> None:
        self.models, self.scores, self.work, self.strategy, self._evaluate, self.say = (
            models, scores, work, strategy, evaluate, say)
        self.n_layers = len({s.module for s in scores})
        self.points: list[GridPoint] = []
        self.by_key: dict[str, GridPoint] = {}
        self.aligned = self.measure("aligned", None, None)
        self.finetuned = self.measure("finetuned", models.finetuned, None)

    def measure(self, name: str, adapter: str | Path | None, limit: Screen) -> dict[str, Any]:
        limits = dict(zip(SCREENED_SUITES, limit)) if limit else None
        return _metrics(self._evaluate(adapter=adapter, out_dir=self.work / "evals" / name, limits=limits))

    def run(self, taus: Sequence[float], coarse: Sequence[float], search: SearchSettings, limits: Limits,
            late: Sequence[int] = ()) -> None:
        """Coarse-to-fine (see :func:`autotune`): the coarse grid (the paper's rule, then the late-block candidates
        ``late``) on the screen, the α neighbours of the distinct leaders on the screen, then the leaders on the
        whole validation sets."""
        for tau in taus:
            for alpha in coarse:
                self.point(tau, alpha, search.screen)
        for min_layer in late:
            for gain in LATE_GAINS:
                for alpha in coarse:
                    self.point(LATE_TAU, alpha, search.screen, gain, min_layer)
        if search.screen:
            for p in distinct_leaders(self.points, limits, search.finalists):
                for alpha in neighbours(p.alpha, search.alphas):
                    self.point(p.tau, alpha, search.screen, p.safety_gain, p.min_layer)
            for p in distinct_leaders(self.points, limits, search.finalists):
                self.point(p.tau, p.alpha, None, p.safety_gain, p.min_layer)

    def point(self, tau: float, alpha: float, limit: Screen, safety_gain: float = 1.0,
              min_layer: int = 0) -> GridPoint:
        """Measure (τ, α[, g, min_layer]) on the first ``limit`` validation items (``None``: all), reusing any
        measurement of the same merge at this rung or a more precise one."""
        merged = sorted(select_below(self.scores, tau, min_layer=min_layer))
        key = _merge_key(merged, alpha, safety_gain)
        ident = (tau, alpha, safety_gain, min_layer)
        p = next((q for q in self.points if (q.tau, q.alpha, q.safety_gain, q.min_layer) == ident), None)
        if p is None:
            p = GridPoint(tau, alpha, merged, safety_gain=safety_gain, min_layer=min_layer)
            p.label = p.describe()
            self.points.append(p)
        elif p.harmful_rate is not None and (limit is not None or p.rung == "full"):
            return p  # already measured at this rung or a more precise one
        if not merged or alpha == 1.0:  # identical to the fine-tuned model
            self._copy(p, self.finetuned, str(self.models.finetuned), str(self.work / "evals" / "finetuned"), "full")
            return p
        twin = self.by_key.get(key)
        if twin is not None and twin is not p and (limit is not None or twin.rung == "full"):
            self._copy(p, {"harmful_rate": twin.harmful_rate, "utility": twin.utility, "n": twin.n,
                           "over_refusal": twin.over_refusal}, twin.adapter, twin.eval_dir, twin.rung)
            return p
        adapter = self._merged(key, p)
        self._copy(p, self.measure(key, adapter, limit), str(adapter), str(self.work / "evals" / key),
                   "screen" if limit else "full")
        self.by_key[key] = p
        refusal = "" if p.over_refusal is None else f", over-refusal {p.over_refusal:.3f}"
        self.say(f"  {p.label} [{p.rung}]: merged {len(merged)}/{self.n_layers} layers, harmful "
                 f"{p.harmful_rate:.3f}, utility {p.utility:.3f}{refusal}")
        return p

    def _merged(self, key: str, p: GridPoint) -> Path:
        adapter = self.work / "merged" / key
        if not adapter.exists():
            safemerge_adapters(self.models, adapter, settings=p.settings(self.strategy))
        return adapter

    @staticmethod
    def _copy(p: GridPoint, m: Mapping[str, Any], adapter: str | None, eval_dir: str | None, rung: str) -> None:
        p.harmful_rate, p.utility, p.n, p.over_refusal = m["harmful_rate"], m["utility"], m["n"], m["over_refusal"]
        p.adapter, p.eval_dir, p.rung = adapter, eval_dir, rung
