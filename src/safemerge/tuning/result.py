"""What :func:`safemerge.tuning.search.autotune` returns: the choice, every measured point and the rule's inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemerge.safety.settings import SafeMergeSettings
from safemerge.tuning.grid import GridPoint
from safemerge.tuning.pareto import Limits


@dataclass
class AutotuneResult:
    """Outcome of :func:`~safemerge.tuning.search.autotune` (everything needed to redraw the plots or audit
    the choice)."""

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

    def settings(self, strategy: str = "linear") -> SafeMergeSettings:
        """The chosen point's :class:`~safemerge.safety.settings.SafeMergeSettings`."""
        return self.chosen.settings(strategy)

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
