"""Automatic τ/α for SafeMERGE: a validated grid search with a harm constraint.

SafeMERGE (Djuhera et al. 2025) merges layer ``i`` as ``α ΔW_f + (1−α) ΔW_s`` when its safety
similarity ``ρ_i = cos(C_i ΔW_f,i, ΔW_f,i)`` is below ``τ`` (SafeLoRA, Hsu et al. 2024, Eq. 2 for
``ρ``). The paper fixes ``τ`` and ``α`` by hand and names tuning ``τ`` as a limitation; no
published tool selects them. :func:`autotune` does it as a constrained selection on validation
prompts:

    (τ*, α*) = argmax_{(τ, α) ∈ G}  U(τ, α)   subject to   H(τ, α) ≤ H_aligned + m
                                                        R(τ, α) ≤ R_aligned + m_R   (with a benign set)

where ``U`` is the utility accuracy, ``H`` the harmful rate and ``R`` the over-refusal rate on the
validation sets, ``H_aligned`` and ``R_aligned`` the aligned model's rates and ``m``, ``m_R`` the margins
(default 3 and 5 points). A repaired model that refuses harmless look-alikes it used to answer has not
kept its alignment, it has traded helpfulness for it — so over-refusal is a constraint, not a footnote.
Ties go to the lower harmful rate, then the larger ``α`` (closer to the fine-tuned update), then the
smaller ``τ`` (fewer merged layers). If no grid point meets the constraints, the point with the smallest
total excess over the limits is chosen and the result says so.

The grid holds the paper's rule (``ρ < τ``, convex weights) and, unless ``extensions=False``, the late-block
extension of :mod:`safemerge.methods.safety_params`: every layer of the last sixth or third of the blocks
(``min_layer``) merged with safety gain 1 or 2 (``α ΔW_f + g(1−α) ΔW_s``). It is there because on the demo's
SmolLM2-135M fine-tune the erosion sits in the last blocks, which ρ does not single out (docs/demo.md, sixth
session); which rule won is part of the result.

Cost control: the scan (``ρ`` of every layer) is computed once; two grid points that select the
same layers with the same ``α`` are the same model and are evaluated once; every merged adapter and
every generation is cached under ``work_dir``, so a rerun regenerates nothing.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from safemerge.errors import SafemergeError
from safemerge.methods.safety_params import SAFEMERGE_ALPHA, SAFEMERGE_TAU, safemerge_weights
from safemerge.options import RunOptions

# SafeMERGE's τ/α defaults and the ρ < τ rule live in safemerge.methods.safety_params (the paper's values, as the
# reference code uses them; selection goes through safemerge.safety.selection.select_below); here: the search grid.
PAPER_TAU = SAFEMERGE_TAU.default
PAPER_ALPHA = SAFEMERGE_ALPHA.default
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_HARM_MARGIN = 0.03
DEFAULT_REFUSAL_MARGIN = 0.05
# Screening: the first 48 harmful and 32 utility validation items; the 4 best points are refined and decided
# on the whole validation sets (issue 17: >= 150 harmful and >= 100 utility items for the deciding points).
DEFAULT_SCREEN: tuple[int, int] = (48, 32)
DEFAULT_FINALISTS = 4
# Promotion from the screen is optimistic by one standard error of the screen's harmful rate: on 32 items one answer
# is 3 points, so a point measured just above the harm limit may well meet it on the whole set (issue 17, fourth run:
# the strict screen promoted only α ≤ 0.2 and the decision never saw the points that keep the skill).
SCREEN_Z = 1.0
# The late-block extension's candidates: the last sixth and third of the blocks, safety gain 1 and 2, every layer of
# the band (τ above any ρ).
LATE_FRACTIONS: tuple[float, ...] = (1 / 6, 1 / 3)
LATE_GAINS: tuple[float, ...] = (1.0, 2.0)
LATE_TAU = 1.0
Log = Callable[[str], None]
# Evaluation defaults of demo/autotune: the CPU-aware dtype decision (bf16 where native: ~3x faster than float32
# batch 16, same keyword-judge decisions on >= 95% of prompts) and a batch sized from memory; bf16 generations are
# cached under their own identity.
EVAL_DTYPE: str | None = None
EVAL_BATCH: int | None = None


# ----------------------------------------------------------------------------- evaluation helper
class LazyGenerator:
    """A generator that loads ``model`` (+ ``adapter``) only when a generation is not cached.

    :func:`safemerge.evaluate.api.evaluate` accepts a ready generator; this one has the same
    identity as the evaluation harness would compute, so cached generations are found without
    loading the model at all.
    """

    backend = "hf"

    def __init__(self, model: str | Path, adapter: str | Path | None = None, dtype: str | None = EVAL_DTYPE) -> None:
        from safemerge.evaluate.generate import generation_dtype, model_identity

        self.model_path, self.adapter = str(model), (str(adapter) if adapter else None)
        self.dtype = generation_dtype(self.model_path, dtype)  # the evaluation default: bf16 where native
        identity = model_identity(self.model_path, self.adapter)
        self.identity = identity if self.dtype == "float32" else f"{identity}:{self.dtype}"
        self._gen: Any = None

    def _load(self) -> Any:
        if self._gen is None:
            from safemerge.evaluate.generate import load_generator

            self._gen = load_generator(self.model_path, adapter=self.adapter, backend="hf", dtype=self.dtype)
        return self._gen

    def generate(self, prompts: list[Any], **kw: Any) -> list[str]:
        return self._load().generate(prompts, **kw)

    def complete(self, texts: list[str], **kw: Any) -> list[str]:
        return self._load().complete(texts, **kw)


def evaluate_suites(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    suites: Mapping[str, Any],
    max_new_tokens: Mapping[str, int] | None = None,
    out_dir: str | Path,
    judge: str = "keyword",
    batch_size: int | None = EVAL_BATCH,
    progress: bool = False,
    dtype: str | None = EVAL_DTYPE,
    limits: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (+ ``adapter``) on several suites, each with its own generation budget.

    Each suite is evaluated by :func:`safemerge.evaluate.api.evaluate` into ``out_dir/<suite>/``
    (its generation cache lives there); the combined ``results.json`` (same schema as
    ``safemerge eval``) is written to ``out_dir`` and returned.
    """
    from safemerge.evaluate.api import evaluate
    from safemerge.io.output import atomic_write_text

    options = RunOptions(progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = LazyGenerator(model, adapter, dtype)
    combined: dict[str, Any] = {"model": str(model), "adapter": str(adapter) if adapter else None,
                                "model_identity": gen.identity,
                                "settings": {"max_new_tokens": {}, "sets": {}, "dtype": dtype}}
    for name in ("harmful", "benign", "utility"):
        spec = suites.get(name)
        if spec is None:
            continue
        mnt = (max_new_tokens or {}).get(name)
        res = evaluate(str(model), adapter=str(adapter) if adapter else None, judge=judge, batch_size=batch_size,
                       max_new_tokens=mnt, out_dir=out / name, generator=gen, options=options,
                       limit=(limits or {}).get(name), **{name: spec})
        combined[name] = res[name]
        combined["settings"]["max_new_tokens"][name] = res["settings"]["max_new_tokens"][name]
        combined["settings"]["sets"][name] = res["settings"]["sets"][name]
        combined["settings"]["backend"] = res["settings"]["backend"]
        combined["settings"]["dtype"] = res["settings"]["dtype"]
    atomic_write_text(out / "results.json", json.dumps(combined, indent=2, ensure_ascii=False) + "\n")
    return combined


# ----------------------------------------------------------------------------- grid
@dataclass
class GridPoint:
    """One evaluated (τ, α): which modules it merges and what it scores on validation."""

    tau: float
    alpha: float
    merged: list[str]
    harmful_rate: float | None = None
    utility: float | None = None
    over_refusal: float | None = None  # on the benign validation set, when there is one
    adapter: str | None = None
    eval_dir: str | None = None
    feasible: bool = False
    pareto: bool = False
    chosen: bool = False
    label: str = ""
    n: list[int] = field(default_factory=list)  # validation items behind the rates: [harmful, utility(, benign)]
    rung: str = "full"  # "screen" (first validation items only) or "full"
    safety_gain: float = 1.0  # the extensions (safety_params): 1 and 0 are the paper's rule
    min_layer: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_merged"] = len(self.merged)
        return d

    @property
    def paper_rule(self) -> bool:
        return self.safety_gain == 1.0 and self.min_layer == 0

    def merge_kwargs(self) -> dict[str, float | int]:
        """The :func:`~safemerge.safety.api.safemerge_adapters` arguments that write this point."""
        return {"tau": self.tau, "alpha": self.alpha, "safety_gain": self.safety_gain, "min_layer": self.min_layer}

    def describe(self) -> str:
        """``τ = 0.35, α = 0.8``, or the extension's ``blocks ≥ 25, α = 0.1, g = 2``."""
        if self.paper_rule:
            return f"τ = {self.tau:g}, α = {self.alpha:g}"
        where = f"blocks ≥ {self.min_layer}" if self.min_layer else f"τ = {self.tau:g}"
        return f"{where}, α = {self.alpha:g}" + (f", g = {self.safety_gain:g}" if self.safety_gain != 1.0 else "")


@dataclass
class AutotuneResult:
    """Outcome of :func:`autotune` (everything needed to redraw the plots or audit the choice)."""

    chosen: GridPoint
    points: list[GridPoint]
    aligned: dict[str, float | None]
    finetuned: dict[str, float | None]
    harm_margin: float
    constraint_met: bool
    rhos: dict[str, float]
    work_dir: Path
    plot: Path | None = None
    sweep_plot: Path | None = None
    refusal_margin: float | None = None  # None: no benign validation set, over-refusal unconstrained
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def limits(self) -> Limits:
        return Limits.around(self.aligned, self.harm_margin, self.refusal_margin)

    @property
    def tau(self) -> float:
        return self.chosen.tau

    @property
    def alpha(self) -> float:
        return self.chosen.alpha

    def merge_kwargs(self) -> dict[str, float | int]:
        return self.chosen.merge_kwargs()

    def describe(self) -> str:
        return self.chosen.describe()

    @property
    def pareto_front(self) -> list[GridPoint]:
        return sorted((p for p in self.points if p.pareto), key=lambda p: (p.harmful_rate or 0.0, -(p.utility or 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "safemerge-autotune",
            "rule": "max utility s.t. harmful_rate <= aligned harmful_rate + harm_margin"
                    + (" and over_refusal <= aligned over_refusal + refusal_margin" if self.refusal_margin is not None
                       else ""),
            "harm_margin": self.harm_margin,
            "refusal_margin": self.refusal_margin,
            "constraint_met": self.constraint_met,
            "chosen": self.chosen.to_dict(),
            "aligned": self.aligned,
            "finetuned": self.finetuned,
            "rhos": self.rhos,
            "points": [p.to_dict() for p in self.points],
            "pareto_front": [{"tau": p.tau, "alpha": p.alpha, "safety_gain": p.safety_gain, "min_layer": p.min_layer,
                              "harmful_rate": p.harmful_rate, "utility": p.utility, "over_refusal": p.over_refusal}
                             for p in self.pareto_front],
            "plot": str(self.plot) if self.plot else None,
            "sweep_plot": str(self.sweep_plot) if self.sweep_plot else None,
        }


def tau_candidates(rhos: Sequence[float], *, max_taus: int = 6, include: Sequence[float] = (PAPER_TAU,)) -> list[float]:
    """Thresholds that give distinct layer selections under the strict rule ``ρ < τ``.

    With sorted distinct similarities ``r_1 < … < r_n``, ``τ_k = (r_k + r_{k+1})/2`` merges exactly
    the ``k`` least similar layers and ``τ_n = r_n + 0.01`` merges all of them. When there are more
    than ``max_taus`` such thresholds, evenly spaced ones (by number of merged layers) are kept;
    the values in ``include`` (the paper's 0.35) are always added.
    """
    rs = sorted({round(float(r), 6) for r in rhos})
    if not rs:
        return sorted({float(t) for t in include})
    cands = [(rs[k] + rs[k + 1]) / 2 for k in range(len(rs) - 1)] + [min(1.0, rs[-1] + 0.01)]
    if len(cands) > max_taus:
        idx = sorted({round(i * (len(cands) - 1) / (max_taus - 1)) for i in range(max_taus)})
        cands = [cands[i] for i in idx]
    return sorted({round(t, 4) for t in cands} | {float(t) for t in include})


def pareto_mask(points: Sequence[tuple[float, float]]) -> list[bool]:
    """``True`` for points not dominated in (harmful ↓, utility ↑); of exact duplicates only the first."""
    out = []
    for i, (h, u) in enumerate(points):
        dominated = any((h2 <= h and u2 >= u) and (h2 < h or u2 > u) for j, (h2, u2) in enumerate(points) if j != i)
        duplicate = any((h2, u2) == (h, u) for h2, u2 in points[:i])
        out.append(not dominated and not duplicate)
    return out


@dataclass(frozen=True)
class Limits:
    """The constraints of the selection rule: harmful rate and (optionally) over-refusal ceilings."""

    harm: float
    refusal: float | None = None

    @staticmethod
    def around(aligned: Mapping[str, Any], harm_margin: float, refusal_margin: float | None) -> Limits:
        """``H_aligned + m`` and, when the aligned model's over-refusal was measured, ``R_aligned + m_R``."""
        refusal = aligned.get("over_refusal")
        return Limits(float(aligned["harmful_rate"]) + harm_margin + 1e-12,
                      None if refusal is None or refusal_margin is None else float(refusal) + refusal_margin + 1e-12)

    def excess(self, p: GridPoint, z: float = 0.0) -> float:
        """How far ``p`` is above the limits (0 when it meets them); with ``z > 0`` its harmful rate is read
        optimistically, ``z`` binomial standard errors lower (the screen's promotion rule)."""
        h = p.harmful_rate or 0.0
        n = p.n[0] if p.n else 0
        se = (h * (1.0 - h) / n) ** 0.5 if n else 0.0
        over = max(0.0, h - z * se - self.harm)
        if self.refusal is not None and p.over_refusal is not None:
            over += max(0.0, p.over_refusal - self.refusal)
        return over

    def met(self, p: GridPoint, z: float = 0.0) -> bool:
        return self.excess(p, z) == 0.0


def _scored(points: Sequence[GridPoint]) -> list[GridPoint]:
    return [p for p in points if p.harmful_rate is not None and p.utility is not None]


def rank_points(points: Sequence[GridPoint], limits: Limits, z: float = 0.0) -> list[GridPoint]:
    """Points in the order of the selection rule: those within ``limits`` by utility (ties: lower harm,
    larger α, smaller τ), then the others by their excess over the limits. The first one is the choice;
    with ``z`` (:data:`SCREEN_Z`) the same order, read optimistically, promotes points from the screen."""
    scored = _scored(points)
    feasible = sorted((p for p in scored if limits.met(p, z)),
                      key=lambda p: (-p.utility, p.harmful_rate, -p.alpha, p.tau))
    rest = sorted((p for p in scored if not limits.met(p, z)),
                  key=lambda p: (limits.excess(p, z), p.harmful_rate, -p.utility, -p.alpha, p.tau))
    return feasible + rest


def distinct_leaders(points: Sequence[GridPoint], limits: Limits, k: int, z: float = SCREEN_Z) -> list[GridPoint]:
    """The ``k`` best points of :func:`rank_points` (optimistic by ``z``) that are distinct models: two (τ, α)
    that merge the same layers with the same α count once, so ``k`` finalists are ``k`` different merges."""
    out: list[GridPoint] = []
    seen: set[tuple[tuple[str, ...], tuple[float, float]]] = set()
    for p in rank_points(points, limits, z):
        model = (tuple(sorted(p.merged)), tuple(round(w, 6) for w in safemerge_weights(p.alpha, p.safety_gain)))
        if model not in seen:
            seen.add(model)
            out.append(p)
        if len(out) == k:
            break
    return out


def choose(points: Sequence[GridPoint], limits: Limits) -> tuple[GridPoint, bool]:
    """The selection rule of :func:`autotune`; returns ``(point, constraints_met)``."""
    ranked = rank_points(points, limits)
    if not ranked:
        raise SafemergeError("no grid point could be evaluated", "check the validation sets")
    for p in ranked:
        p.feasible = limits.met(p)
    return ranked[0], ranked[0].feasible


def _key(merged: Sequence[str], alpha: float, safety_gain: float = 1.0) -> str:
    ident: list[Any] = [sorted(merged), round(alpha, 6)] + ([round(safety_gain, 6)] if safety_gain != 1.0 else [])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]


def late_block_starts(scores: Sequence[Any], fractions: Sequence[float] = LATE_FRACTIONS) -> list[int]:
    """``min_layer`` of the late-block candidates: the first block of the last ``fraction`` of the blocks."""
    layers = [s.layer for s in scores if s.layer is not None]
    if not layers:
        return []
    n = max(layers) + 1
    return sorted({n - max(1, round(f * n)) for f in fractions if n > 1})


def neighbours(alpha: float, alphas: Sequence[float]) -> list[float]:
    """The grid values adjacent to ``alpha`` in the sorted α grid (the fine step of coarse-to-fine)."""
    grid = sorted(set(alphas) | {alpha})
    i = grid.index(alpha)
    return [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)]


def autotune(
    *,
    base: str | Path,
    aligned: str | Path,
    finetuned: str | Path,
    safety: str | Path,
    val_harmful: Any,
    val_utility: Any,
    work_dir: str | Path,
    taus: Sequence[float] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    harm_margin: float = DEFAULT_HARM_MARGIN,
    val_benign: Any = None,
    refusal_margin: float = DEFAULT_REFUSAL_MARGIN,
    judge: str = "keyword",
    max_new_tokens: Mapping[str, int] | None = None,
    batch_size: int | None = EVAL_BATCH,
    strategy: str = "linear",
    max_taus: int = 6,
    screen: tuple[int, int] | None = DEFAULT_SCREEN,
    finalists: int = DEFAULT_FINALISTS,
    extensions: bool = True,
    log: Log | None = None,
    progress: bool = False,
) -> AutotuneResult:
    """Pick SafeMERGE's (τ, α) on validation prompts (see the module docstring for the rule).

    Coarse-to-fine search: (1) every τ × every other α of ``alphas`` on the first ``screen`` =
    ``(n_harmful, n_utility)`` validation items; (2) the α neighbours of the ``finalists`` best
    screened points, also screened; (3) the ``finalists`` best screened points on the whole
    validation sets, where the rule decides. "Best" on the screen is the rule read optimistically
    (harmful rate one standard error lower, :data:`SCREEN_Z`) over distinct merges
    (:func:`distinct_leaders`). ``screen=None`` evaluates the whole grid on the whole
    sets. Validation prefixes are reused: a full evaluation regenerates nothing the screen made.

    Args:
        base, aligned: unaligned and aligned model directories (the safety subspace).
        finetuned, safety: task and safety LoRA adapters trained on ``aligned``.
        val_harmful, val_utility: prompt-set specs or record lists for validation — keep them
            disjoint from the final test sets (order them so that prefixes span categories).
        work_dir: cache for merged adapters, generations, ``autotune.json`` and the plots.
        taus: thresholds to try (default: :func:`tau_candidates` of the scanned ρ).
        alphas: task weights to try (default 0.1 … 0.9).
        harm_margin: allowed harmful-rate excess over the aligned model, as a fraction (0.03 = 3 points).
        val_benign: benign look-alike prompts (over-refusal); when given, the rule also requires the
            over-refusal rate to stay within ``refusal_margin`` of the aligned model's. Evaluated whole at
            every point (look-alike sets are small and 32 tokens decide a refusal).
        refusal_margin: allowed over-refusal excess over the aligned model (0.05 = 5 points).
        judge: judge spec for the harmful suite (default: keyword refusal).
        max_new_tokens: per-suite generation budgets (``{"harmful": 32, "utility": 64}``).
        screen: validation items per suite for screening, or ``None`` for no screening.
        finalists: how many screened points are refined and evaluated on the whole validation sets.
        extensions: also search the late-block extension (:data:`LATE_FRACTIONS` × :data:`LATE_GAINS`).
        progress: show the evaluation harness's generation progress bars (stderr).

    Returns:
        :class:`AutotuneResult`; ``work_dir/autotune.json``, ``autotune.png`` (Pareto front) and
        ``tau_sweep.png`` are written.
    """
    from safemerge.io.output import atomic_write_text
    from safemerge.safety.api import scan

    alphas = _checked_alphas(alphas, harm_margin, refusal_margin)
    say = log or (lambda _m: None)
    work = Path(work_dir).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    suites = {"harmful": val_harmful, "utility": val_utility}
    if val_benign is not None:
        suites["benign"] = val_benign

    say("autotune: scanning layer similarities once")
    scores = scan(base, aligned, [finetuned], tau=PAPER_TAU)
    rhos = {s.module: float(s.rho) for s in scores}
    grid_taus = sorted({float(t) for t in taus}) if taus else tau_candidates(list(rhos.values()), max_taus=max_taus)
    search = _GridSearch(
        models=(base, aligned, finetuned, safety), scores=scores, n_layers=len(rhos), work=work, strategy=strategy,
        evaluate=partial(evaluate_suites, aligned, suites=suites, max_new_tokens=max_new_tokens, judge=judge,
                         batch_size=batch_size, progress=progress), say=say)
    if search.aligned["harmful_rate"] is None:
        raise SafemergeError("the validation harmful set is empty", "pass a non-empty --val-harmful set")
    limits = Limits.around(search.aligned, harm_margin, refusal_margin if val_benign is not None else None)

    coarse = alphas[::2] if len(alphas) > 2 and screen else alphas
    if alphas[-1] not in coarse:
        coarse = [*coarse, alphas[-1]]
    say(f"autotune: τ ∈ {grid_taus}; α ∈ {coarse} (coarse) of {alphas}; screen {screen}, {finalists} finalists")
    late = late_block_starts(scores) if extensions else []
    if late:
        say(f"autotune: late-block extension: blocks ≥ {late}, safety gain {list(LATE_GAINS)}")
    search.run(grid_taus, coarse, alphas, screen, finalists, limits, late=late)
    points = search.points
    mask = pareto_mask([(p.harmful_rate or 0.0, p.utility or 0.0) for p in points])
    for p, m in zip(points, mask):
        p.pareto = m
    chosen, ok = choose([p for p in points if p.rung == "full"], limits)
    chosen.chosen = True
    result = AutotuneResult(chosen=chosen, points=points, aligned=search.aligned, finetuned=search.finetuned,
                            harm_margin=harm_margin, constraint_met=ok, rhos=rhos, work_dir=work,
                            refusal_margin=refusal_margin if val_benign is not None else None)
    result.plot = plot_pareto(result, work / "autotune.png")
    result.sweep_plot = plot_tau_sweep(result, work / "tau_sweep.png")
    atomic_write_text(work / "autotune.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _checked_alphas(alphas: Sequence[float], harm_margin: float, refusal_margin: float) -> list[float]:
    """The sorted α grid, after checking it and both margins (a clear error, never a traceback)."""
    for flag, margin in (("--harm-margin", harm_margin), ("--refusal-margin", refusal_margin)):
        if not 0.0 <= margin <= 1.0:
            raise SafemergeError(f"{flag} must be a fraction in [0, 1], got {margin}",
                                 f"pass e.g. {flag} 0.05 for 5 points")
    grid = sorted({float(a) for a in alphas})
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise SafemergeError(f"alphas must lie in [0, 1], got {grid}", "pass values such as 0.5,0.7,0.9")
    return grid


def _metrics(res: dict[str, Any]) -> dict[str, Any]:
    """Harmful rate, utility, over-refusal (when a benign set ran) and item counts of one validation run."""
    m = {"harmful_rate": res["harmful"]["harmful_rate"], "utility": res["utility"]["accuracy"],
         "over_refusal": None, "n": [res["harmful"]["n"], res["utility"]["n"]]}
    if "benign" in res:
        m["over_refusal"] = res["benign"]["over_refusal_rate"]
        m["n"].append(res["benign"]["n"])
    return m


class _GridSearch:
    """The measured (τ, α) points of one :func:`autotune` call: one evaluation per distinct merge (same layers,
    same α), merged adapters and generations cached under ``work``; the aligned and fine-tuned models are
    measured first, on the whole validation sets."""

    def __init__(self, *, models: tuple[str | Path, str | Path, str | Path, str | Path], scores: Sequence[Any],
                 n_layers: int, work: Path, strategy: str, evaluate: Callable[..., dict[str, Any]], say: Log) -> None:
        self.base, self.aligned_model, self.finetuned_model, self.safety = models
        self.scores, self.n_layers, self.work, self.strategy, self._evaluate, self.say = (
            scores, n_layers, work, strategy, evaluate, say)
        self.points: list[GridPoint] = []
        self.by_key: dict[str, GridPoint] = {}
        self.aligned = self.measure("aligned", None, None)
        self.finetuned = self.measure("finetuned", self.finetuned_model, None)

    def measure(self, name: str, adapter: str | Path | None, limit: tuple[int, int] | None) -> dict[str, Any]:
        limits = dict(zip(("harmful", "utility"), limit)) if limit else None
        return _metrics(self._evaluate(adapter=adapter, out_dir=self.work / "evals" / name, limits=limits))

    def run(self, taus: Sequence[float], coarse: Sequence[float], alphas: Sequence[float],
            screen: tuple[int, int] | None, finalists: int, limits: Limits, late: Sequence[int] = ()) -> None:
        """Coarse-to-fine (see :func:`autotune`): the coarse grid (the paper's rule, then the late-block candidates
        ``late``) on the screen, the α neighbours of the distinct leaders on the screen, then the leaders on the
        whole validation sets."""
        for tau in taus:
            for alpha in coarse:
                self.point(tau, alpha, screen)
        for min_layer in late:
            for gain in LATE_GAINS:
                for alpha in coarse:
                    self.point(LATE_TAU, alpha, screen, gain, min_layer)
        if screen:
            for p in distinct_leaders(self.points, limits, finalists):
                for alpha in neighbours(p.alpha, alphas):
                    self.point(p.tau, alpha, screen, p.safety_gain, p.min_layer)
            for p in distinct_leaders(self.points, limits, finalists):
                self.point(p.tau, p.alpha, None, p.safety_gain, p.min_layer)

    def point(self, tau: float, alpha: float, limit: tuple[int, int] | None, safety_gain: float = 1.0,
              min_layer: int = 0) -> GridPoint:
        """Measure (τ, α[, g, min_layer]) on the first ``limit`` validation items (``None``: all), reusing any
        measurement of the same merge at this rung or a more precise one."""
        from safemerge.safety.selection import select_below

        merged = sorted(select_below(self.scores, tau, min_layer=min_layer))
        key = _key(merged, alpha, safety_gain)
        p = next((q for q in self.points if (q.tau, q.alpha, q.safety_gain, q.min_layer) == (tau, alpha, safety_gain,
                                                                                                 min_layer)), None)
        if p is None:
            p = GridPoint(tau, alpha, merged, safety_gain=safety_gain, min_layer=min_layer)
            p.label = p.describe().replace(" = ", "=").replace(", ", " ")
            self.points.append(p)
        elif p.harmful_rate is not None and (limit is not None or p.rung == "full"):
            return p  # already measured at this rung or a more precise one
        if not merged or alpha == 1.0:  # identical to the fine-tuned model
            self._copy(p, self.finetuned, str(self.finetuned_model), str(self.work / "evals" / "finetuned"), "full")
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
        from safemerge.safety.api import safemerge_adapters

        adapter = self.work / "merged" / key
        if not adapter.exists():
            safemerge_adapters(base=self.base, aligned=self.aligned_model, finetuned=self.finetuned_model,
                               safety=self.safety, out=adapter, strategy=self.strategy, **p.merge_kwargs())
        return adapter

    @staticmethod
    def _copy(p: GridPoint, m: Mapping[str, Any], adapter: str | None, eval_dir: str | None, rung: str) -> None:
        p.harmful_rate, p.utility, p.n, p.over_refusal = m["harmful_rate"], m["utility"], m["n"], m["over_refusal"]
        p.adapter, p.eval_dir, p.rung = adapter, eval_dir, rung


# ----------------------------------------------------------------------------- reporting
def pareto_table(result: AutotuneResult) -> list[tuple[str, ...]]:
    """Rows ``(τ, α, merged layers, harmful, utility, over-refusal)`` of the Pareto front, chosen point marked; a
    late-block point shows ``blocks ≥ K`` for τ and its safety gain after α."""
    rows = []
    for p in result.pareto_front:
        mark = " ← chosen" if p.chosen else ""
        refusal = "–" if p.over_refusal is None else f"{100 * p.over_refusal:.1f}%"
        where = f"blocks ≥ {p.min_layer}" if p.min_layer else f"{p.tau:g}"
        weight = f"{p.alpha:g}" + (f" (g {p.safety_gain:g})" if p.safety_gain != 1.0 else "")
        rows.append((where, weight, f"{len(p.merged)}/{len(result.rhos)}",
                     f"{100 * (p.harmful_rate or 0):.1f}%", f"{100 * (p.utility or 0):.1f}%{mark}", refusal))
    return rows


def rule_text(result: AutotuneResult) -> str:
    """The constraints in words, e.g. ``harmful ≤ aligned 12.5% + 3 pts, over-refusal ≤ aligned 14.0% + 5 pts``."""
    text = f"harmful ≤ aligned {100 * (result.aligned['harmful_rate'] or 0):.1f}% + {100 * result.harm_margin:g} pts"
    if result.refusal_margin is not None:
        text += (f", over-refusal ≤ aligned {100 * (result.aligned.get('over_refusal') or 0):.1f}% + "
                 f"{100 * result.refusal_margin:g} pts")
    return text


def print_pareto(result: AutotuneResult, console: Any = None) -> None:
    """Print the Pareto front and the choice with rich."""

    con = console or Console(stderr=False)
    t = Table(title=f"automatic τ/α — Pareto front on validation ({rule_text(result)})")
    for col in ("τ", "α", "merged", "harmful", "utility", "over-refusal"):
        t.add_column(col, justify="right")
    for row in pareto_table(result):
        t.add_row(*row)
    con.print(t)
    c = result.chosen
    note = "" if result.constraint_met else " (no point met the constraints: the one closest to them chosen)"
    refusal = "" if c.over_refusal is None else f", over-refusal {100 * c.over_refusal:.1f}%"
    con.print(f"chosen: {c.describe()} — validation harmful {100 * (c.harmful_rate or 0):.1f}%, "
              f"utility {100 * (c.utility or 0):.1f}%{refusal}{note}")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from safemerge.io.output import atomic_save_figure

    try:
        atomic_save_figure(fig, path, dpi=110, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def plot_pareto(result: AutotuneResult, path: str | Path) -> Path:
    """Validation harmful rate vs utility of every grid point, the Pareto front and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    pts = [p for p in result.points if p.harmful_rate is not None and p.utility is not None]
    lim = result.limits
    over = [p for p in pts if lim.refusal is not None and p.over_refusal is not None and p.over_refusal > lim.refusal]
    ok = [p for p in pts if p not in over]
    ax.scatter([p.harmful_rate for p in ok], [p.utility for p in ok], c="#9aa", s=22, label="grid (τ, α)")
    if over:
        ax.scatter([p.harmful_rate for p in over], [p.utility for p in over], c="#9aa", marker="x", s=22,
                   label="over-refusal above its limit")
    front = result.pareto_front
    ax.plot([p.harmful_rate for p in front], [p.utility for p in front], "-o", c="#1f77b4", ms=4, label="Pareto front")
    ah, fu = result.aligned["harmful_rate"] or 0.0, result.finetuned
    ax.axvspan(-0.05, ah + result.harm_margin, color="#2ca02c", alpha=0.08,
               label=f"allowed: ≤ aligned + {100 * result.harm_margin:g} pts")
    ax.scatter([ah], [result.aligned["utility"] or 0.0], marker="s", c="#2ca02c", s=50, label="aligned")
    ax.scatter([fu["harmful_rate"] or 0.0], [fu["utility"] or 0.0], marker="^", c="#d62728", s=50, label="fine-tuned")
    c = result.chosen
    ax.scatter([c.harmful_rate], [c.utility], marker="*", c="gold", edgecolors="k", s=220, zorder=5,
               label=f"chosen {c.describe()}")
    ax.set_xlabel("validation harmful rate (lower is safer)")
    ax.set_ylabel("validation utility accuracy")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("SafeMERGE automatic τ/α")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_tau_sweep(result: AutotuneResult, path: str | Path) -> Path:
    """Harmful rate and utility against τ, one line per α (the trade-off the user tunes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8), sharex=True)
    paper = [p for p in result.points if p.paper_rule]
    for alpha in sorted({p.alpha for p in paper}):
        ps = sorted((p for p in paper if p.alpha == alpha), key=lambda p: p.tau)
        a1.plot([p.tau for p in ps], [p.harmful_rate for p in ps], "-o", ms=3, label=f"α={alpha:g}")
        a2.plot([p.tau for p in ps], [p.utility for p in ps], "-o", ms=3, label=f"α={alpha:g}")
    c = result.chosen
    for ax, val in ((a1, c.harmful_rate), (a2, c.utility)):
        ax.axvline(PAPER_TAU, ls=":", c="k", lw=1, label=f"paper τ={PAPER_TAU:g}")
        ax.scatter([c.tau], [val], marker="*", c="gold", edgecolors="k", s=180, zorder=5, label="chosen")
        ax.set_xlabel("τ (layers with ρ < τ are merged)")
        ax.grid(alpha=0.3)
    a1.axhline(result.aligned["harmful_rate"] or 0.0, ls="--", c="#2ca02c", lw=1, label="aligned")
    a1.set_ylabel("validation harmful rate")
    a2.set_ylabel("validation utility")
    a2.legend(fontsize=7)
    fig.suptitle("τ sweep")
    fig.tight_layout()
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- CLI glue
def parse_tau_alpha(tau: str | float, alpha: str | float) -> tuple[float | None, float | None]:
    """``"auto"`` → ``None`` (to be tuned), a number → itself; anything else is a user error."""
    out: list[float | None] = []
    for name, v in (("--tau", tau), ("--alpha", alpha)):
        if isinstance(v, str) and v.strip().lower() == "auto":
            out.append(None)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError) as exc:
            raise SafemergeError(f"{name} must be a number or 'auto', got {v!r}",
                                 f"pass e.g. {name} 0.35 or {name} auto") from exc
    return out[0], out[1]


def resolve_tau_alpha(
    tau: str | float,
    alpha: str | float,
    *,
    base: str | Path,
    aligned: str | Path,
    finetuned: str | Path,
    safety: str | Path,
    val_harmful: Any = None,
    val_utility: Any = None,
    harm_margin: float = DEFAULT_HARM_MARGIN,
    val_benign: Any = None,
    refusal_margin: float = DEFAULT_REFUSAL_MARGIN,
    judge: str = "keyword",
    work_dir: str | Path | None = None,
    extensions: bool = True,
    log: Log | None = None,
) -> tuple[float, float, AutotuneResult | None]:
    """Numbers pass through; ``auto`` for τ and/or α runs :func:`autotune` (the other one fixed; the late-block
    extension is searched only when τ is ``auto``, and the chosen point's ``merge_kwargs`` then hold its gain).

    Used by ``safemerge safemerge --tau auto --alpha auto --val-harmful SET --val-utility SET [--val-benign SET]``.
    The work directory defaults to ``<cache>/autotune/<hash of the inputs>`` so reruns are cached.
    """
    t, a = parse_tau_alpha(tau, alpha)
    if t is not None and a is not None:
        return t, a, None
    if val_harmful is None or val_utility is None:
        raise SafemergeError("--tau auto / --alpha auto need validation prompts",
                             "pass --val-harmful SET and --val-utility SET (keep them disjoint from your test sets)")
    if work_dir is None:
        import os

        root = Path(os.environ.get("SAFEMERGE_CACHE") or Path.home() / ".cache" / "safemerge").expanduser()
        key = hashlib.sha256(json.dumps([str(Path(p).absolute()) for p in (base, aligned, finetuned, safety)]
                                        + [str(val_harmful), str(val_utility), str(val_benign), judge]
                                        ).encode()).hexdigest()[:12]
        work_dir = root / "autotune" / key
    res = autotune(base=base, aligned=aligned, finetuned=finetuned, safety=safety, val_harmful=val_harmful,
                   val_utility=val_utility, work_dir=work_dir, taus=None if t is None else [t],
                   alphas=DEFAULT_ALPHAS if a is None else [a], harm_margin=harm_margin, val_benign=val_benign,
                   refusal_margin=refusal_margin, judge=judge, extensions=extensions and t is None,
                   log=log)
    return res.tau, res.alpha, res
