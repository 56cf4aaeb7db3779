"""Safety-aware data-driven merging (Hammoud et al. 2024): objective, CMA-ES genome, LM-Cocktail, grid, Ray."""
from __future__ import annotations

from typing import Any


def optimize(config: Any, out: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``safemerge optimize`` from Python; see :func:`safemerge.optimize.runner.run_optimize`."""
    from safemerge.optimize.runner import run_optimize

    return run_optimize(config, out, **kwargs)
