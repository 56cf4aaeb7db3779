"""EvoMM: CMA-ES over the merge genome (Akiba et al. 2024; Hammoud et al. 2024, §4.4, App. B).

Minimises ``L_merge(θ(x)) = L_safety + α·L_expert`` over gene vectors ``x`` (see
:mod:`safemerge.optimize.genome`) with the ``cma`` package's ``CMAEvolutionStrategy``
(Hansen 2016, "The CMA Evolution Strategy: A Tutorial"): ``σ0 = 1/6`` and
``popsize = 4 + ⌊3 ln n⌋`` by default (the paper's and pycma's defaults), a budget of
``max_evals`` merged-model evaluations, rounded up to whole generations.

Determinism and resumption: the sampler draws from its own ``numpy.random.RandomState(seed)``
(passed to ``cma`` as the ``randn`` option, with ``cma``'s global seeding disabled), so the run
does not depend on, or disturb, numpy's global RNG. After every generation the whole
``CMAEvolutionStrategy`` object (mean, covariance, step size, RNG state) is pickled to
``cma_state.pkl`` in the run's work directory together with the evaluation count and the best
candidate. That pickle is written and read only by safemerge inside its own work directory; it is
never loaded from a user-supplied path. A resumed run continues the same sequence of candidates
as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from safemerge.errors import SafemergeError, option
from safemerge.optimize.config import CMASection
from safemerge.optimize.genome import Genome
from safemerge.optimize.trace import Trace

STATE_FILE = "cma_state.pkl"
STATE_VERSION = 1


class SeededRandn:
    """A picklable ``randn(lam, N)`` for ``cma`` backed by its own ``RandomState``."""

    def __init__(self, seed: int) -> None:
        self.rs = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rs.randn(*shape)


def default_popsize(n_genes: int) -> int:
    """pycma's default population ``4 + ⌊3 ln n⌋`` (Hammoud et al. 2024, App. B)."""
    return 4 + int(math.floor(3 * math.log(max(1, n_genes))))


def make_strategy(x0: np.ndarray, opts: CMASection) -> Any:
    """A ``cma.CMAEvolutionStrategy`` seeded through :class:`SeededRandn` (``x0`` needs ≥ 2 genes)."""
    import cma

    popsize = opts.popsize or default_popsize(len(x0))
    options = {"popsize": popsize, "seed": float("nan"), "randn": SeededRandn(opts.seed), "verbose": -9}
    return cma.CMAEvolutionStrategy(list(map(float, x0)), float(opts.sigma0), options)


def _atomic_pickle(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_evomm(genome: Genome, backend: Any, opts: CMASection, work: Path, trace: Trace, *, resume: bool = False,
              on_generation: Callable[[int, int], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) CMA-ES; returns ``{"x", "loss", "eval", "evals", "generations", "popsize", "sigma"}``.

    Args:
        genome: the search space.
        backend: object with ``score_vectors(list of vectors) -> list of result dicts`` (serial or Ray).
        opts: the ``cma:`` block.
        work: the run's work directory (state and trace live there).
        trace: the evaluation log.
        resume: continue from ``work/cma_state.pkl``.
        on_generation: called as ``(generation, evals)`` after each checkpoint (tests use it to interrupt).
        progress: called as ``(evals, total)`` after each generation.
    """
    state_path = work / STATE_FILE
    n = len(genome)
    pad = n == 1  # pycma needs ≥ 2 dimensions: optimise a duplicate gene and use the first
    if resume and state_path.is_file():
        with state_path.open("rb") as fh:
            st = pickle.load(fh)  # our own file, written by _atomic_pickle below
        if st.get("version") != STATE_VERSION or st.get("n_genes") != n:
            raise SafemergeError("the saved optimisation state does not match this config",
                                 f"rerun with {option('force')} to start over")
        es, evals, gen, best = st["es"], st["evals"], st["generation"], st["best"]
        trace.truncate(evals)
    else:
        x0 = genome.x0()
        if opts.random_init:
            x0 = genome.x0(random_init=True, seed=opts.seed)
        es = make_strategy(np.concatenate([x0, x0]) if pad else x0, opts)
        evals, gen, best = 0, 0, {"x": None, "loss": math.inf, "eval": None}
        trace.truncate(0)
    popsize = int(es.popsize)
    n_gens = max(1, -(-opts.max_evals // popsize))
    while gen < n_gens:
        X = es.ask()
        xs = [np.asarray(x[:n], dtype=np.float64) for x in X]
        results = backend.score_vectors(xs)
        losses = []
        for x, r in zip(xs, results):
            loss = float(r["loss"])
            if not math.isfinite(loss):
                loss = 1e9
            losses.append(loss)
            trace.add({"eval": evals, "generation": gen, "strategy": "evomm", **r, "sigma": float(es.sigma),
                       "params": genome.summary(x), "x": [float(v) for v in x]})
            if loss < best["loss"]:
                best = {"x": [float(v) for v in x], "loss": loss, "eval": evals}
            evals += 1
        es.tell(X, losses)
        gen += 1
        trace.flush()
        _atomic_pickle({"version": STATE_VERSION, "n_genes": n, "es": es, "evals": evals, "generation": gen,
                        "best": best}, state_path)
        if progress:
            progress(evals, n_gens * popsize)
        if on_generation:
            on_generation(gen, evals)
    return {**best, "evals": evals, "generations": gen, "popsize": popsize, "sigma": float(es.sigma)}
