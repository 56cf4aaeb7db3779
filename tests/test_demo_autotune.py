"""Automatic τ/α: candidate thresholds, Pareto front and the constrained choice."""
from __future__ import annotations

import pytest

from safemerge.autotune import GridPoint, choose, pareto_mask, tau_candidates
from safemerge.errors import SafemergeError


def test_tau_candidates_give_distinct_selections():
    rhos = [0.1, 0.2, 0.2, 0.4]
    taus = tau_candidates(rhos, include=())
    sel = [tuple(sorted(i for i, r in enumerate(rhos) if r < t)) for t in taus]
    assert len(set(sel)) == len(sel) == 3  # {0}, {0,1,2}, all
    assert sel[-1] == (0, 1, 2, 3)
    assert 0.35 in tau_candidates(rhos)  # the paper's τ is always on the grid


def test_tau_candidates_subsample():
    rhos = [i / 100 for i in range(40)]
    taus = tau_candidates(rhos, max_taus=5, include=())
    assert len(taus) == 5 and taus == sorted(taus)
    assert all(r < taus[-1] for r in rhos)


def test_pareto_mask():
    pts = [(0.1, 0.5), (0.2, 0.9), (0.3, 0.8), (0.1, 0.4), (0.0, 0.1)]
    assert pareto_mask(pts) == [True, True, False, False, True]
    assert pareto_mask([(0.1, 0.5), (0.1, 0.5), (0.2, 0.9)]) == [True, False, True]  # duplicates listed once


def _p(tau, alpha, h, u):
    return GridPoint(tau=tau, alpha=alpha, merged=["m"], harmful_rate=h, utility=u)


def test_choose_best_utility_under_harm_constraint():
    pts = [_p(0.3, 0.9, 0.30, 0.95), _p(0.3, 0.8, 0.12, 0.90), _p(0.3, 0.7, 0.10, 0.80), _p(0.5, 0.5, 0.0, 0.2)]
    best, ok = choose(pts, aligned_harm=0.10, margin=0.02)
    assert ok and (best.tau, best.alpha) == (0.3, 0.8)
    assert [p.feasible for p in pts] == [False, True, True, True]


def test_choose_ties_prefer_lower_harm_then_larger_alpha():
    pts = [_p(0.3, 0.7, 0.05, 0.9), _p(0.3, 0.8, 0.08, 0.9), _p(0.4, 0.8, 0.05, 0.9)]
    best, _ = choose(pts, aligned_harm=0.1, margin=0.0)
    assert (best.tau, best.alpha) == (0.3, 0.8) or best.harmful_rate == 0.05
    assert best.harmful_rate == 0.05 and best.alpha == 0.8 and best.tau == 0.4


def test_choose_when_nothing_is_feasible():
    pts = [_p(0.3, 0.9, 0.5, 0.9), _p(0.3, 0.6, 0.3, 0.4)]
    best, ok = choose(pts, aligned_harm=0.0, margin=0.02)
    assert not ok and best.alpha == 0.6


def test_choose_needs_scores():
    with pytest.raises(SafemergeError):
        choose([GridPoint(0.3, 0.8, [])], 0.0, 0.02)
