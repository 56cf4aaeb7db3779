"""The two plots of automatic τ/α: validation harmful rate vs utility (Pareto front) and the τ sweep.

matplotlib is optional: imported when a plot is drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from safemerge.io.output import atomic_save_figure
from safemerge.tuning.grid import PAPER_TAU
from safemerge.tuning.result import AutotuneResult


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    try:
        atomic_save_figure(fig, path, dpi=110, metadata={"Software": None})
    finally:
        _pyplot().close(fig)
    return path


def plot_pareto(result: AutotuneResult, path: str | Path) -> Path:
    """Validation harmful rate vs utility of every grid point, the Pareto front and the choice."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.6))
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
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(9, 3.8), sharex=True)
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
