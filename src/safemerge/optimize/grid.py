"""Grid search over a merge method's parameters — the data-free baseline of Hammoud et al. 2024 (App. B).

Every combination of the ``grid:`` values is applied uniformly (the same weight/density to every
model, the same ``t`` everywhere): for ties/dare_ties ``weight × density`` (the paper's 3 × 3 grid
``{0.25, 0.5, 1.0}²`` for two models), for linear/task_arithmetic ``weight``, for slerp ``t``; for
slerp over more than two models, ``slerp(base, m, t)`` for every other model ``m`` and every ``t``.
The paper selects the grid point with the best domain accuracy on the benchmark; here each point
is scored with the configured objective (use ``data.expert`` only for the paper's setting) and all
points are kept in the trace so any other selection rule can be applied afterwards.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

from safemerge.errors import ConfigError
from safemerge.optimize.config import GridSection
from safemerge.optimize.genome import Genome


def grid_points(genome: Genome, grid: GridSection) -> list[dict[str, float]]:
    """All parameter combinations for the genome's method, in a fixed order."""
    if genome.slerp_top2:
        partners = [i for i, m in enumerate(genome.models) if m != genome.base_model]
        return [{"partner": i, "t": float(t)} for i in partners for t in _nonempty(grid, "t")]
    axes = [(p, _nonempty(grid, p)) for p in genome.params]
    return [dict(zip([p for p, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def _nonempty(grid: GridSection, param: str) -> list[float]:
    vals = list(getattr(grid, param))
    if not vals:
        raise ConfigError(f"grid.{param} is empty", f"give at least one value for grid.{param}")
    return vals


def run_grid(genome: Genome, backend: Any, grid: GridSection, trace: Any, *, progress: Any = None) -> dict[str, Any]:
    """Score every grid point; returns the best ``x`` (lowest loss; ties → first point)."""
    points = grid_points(genome, grid)
    best: dict[str, Any] = {"x": None, "loss": math.inf, "eval": None, "point": None}
    for i, pt in enumerate(points):
        x = genome.grid_vector(pt)
        r = backend.score_vectors([x])[0]
        trace.add({"eval": i, "generation": 0, "strategy": "grid", **r, "point": pt, "params": genome.summary(x)})
        trace.flush()
        if float(r["loss"]) < best["loss"]:
            best = {"x": [float(v) for v in x], "loss": float(r["loss"]), "eval": i, "point": pt}
        if progress:
            progress(i + 1, len(points))
    return {**best, "evals": len(points)}
