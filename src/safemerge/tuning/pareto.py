"""The selection rule of automatic τ/α: the limits around the aligned model, the ranking, the Pareto front.

``max U(τ, α)`` subject to ``H ≤ H_aligned + m`` (and ``R ≤ R_aligned + m_R`` with a benign set); see
:mod:`safemerge.tuning` for the rule and its tie-breaks.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from safemerge.errors import SafemergeError
from safemerge.methods.safety_params import safemerge_weights
from safemerge.tuning.grid import GridPoint

# Promotion from the screen is optimistic by one standard error of the screen's harmful and over-refusal rates: on 32
# items one answer is 3 points, so a point measured just above the harm limit may well meet it on the whole set
# (issue 17, fourth run: the strict screen promoted only α ≤ 0.2 and the decision never saw the points that keep the
# skill); the look-alike screen (50 of 250 items) is read the same way.
SCREEN_Z = 1.0


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
        """How far ``p`` is above the limits (0 when it meets them); with ``z > 0`` its harmful and over-refusal
        rates are read optimistically, ``z`` binomial standard errors lower (the screen's promotion rule)."""
        over = max(0.0, _optimistic(p.harmful_rate or 0.0, p.n_harmful, z) - self.harm)
        if self.refusal is not None and p.over_refusal is not None:
            over += max(0.0, _optimistic(p.over_refusal, p.n_benign, z) - self.refusal)
        return over

    def met(self, p: GridPoint, z: float = 0.0) -> bool:
        return self.excess(p, z) == 0.0


def _optimistic(rate: float, n: int, z: float) -> float:
    """``rate`` minus ``z`` binomial standard errors on ``n`` items (the rate itself when ``z`` or ``n`` is 0)."""
    return rate - z * (rate * (1.0 - rate) / n) ** 0.5 if n and z else rate


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
    seen: set[tuple[tuple[str, ...], tuple[float, ...]]] = set()
    for p in rank_points(points, limits, z):
        model = (tuple(sorted(p.merged)), tuple(round(w, 6) for w in safemerge_weights(p.alpha, p.safety_gain)))
        if model not in seen:
            seen.add(model)
            out.append(p)
        if len(out) == k:
            break
    return out


def choose(points: Sequence[GridPoint], limits: Limits) -> tuple[GridPoint, bool]:
    """The selection rule of :func:`safemerge.tuning.search.autotune`; returns ``(point, constraints_met)``."""
    ranked = rank_points(points, limits)
    if not ranked:
        raise SafemergeError("no grid point could be evaluated", "check the validation sets")
    for p in ranked:
        p.feasible = limits.met(p)
    return ranked[0], ranked[0].feasible


def mark_pareto_front(points: Sequence[GridPoint]) -> None:
    """Set ``pareto`` on the points not dominated in (harmful ↓, utility ↑)."""
    mask = pareto_mask([(p.harmful_rate or 0.0, p.utility or 0.0) for p in points])
    for p, m in zip(points, mask):
        p.pareto = m
