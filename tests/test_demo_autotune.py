"""Automatic τ/α: candidate thresholds, Pareto front and the constrained choice."""
from __future__ import annotations

from dataclasses import asdict

import pytest

import safemerge.tuning.search as search_module
from safemerge.errors import SafemergeError
from safemerge.evaluate.records import PromptSets
from safemerge.safety.selection import LayerScore
from safemerge.safety.settings import SafeMergeModels
from safemerge.tuning.grid import (
    DEFAULT_ALPHAS,
    LATE_GAINS,
    LATE_TAU,
    GridPoint,
    SearchSettings,
    late_block_starts,
    neighbours,
    tau_candidates,
)
from safemerge.tuning.pareto import Limits, choose, distinct_leaders, pareto_mask, rank_points
from safemerge.tuning.search import autotune


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
    best, ok = choose(pts, Limits.around({'harmful_rate': 0.10}, 0.02, None))
    assert ok and (best.tau, best.alpha) == (0.3, 0.8)
    assert [p.feasible for p in pts] == [False, True, True, True]


def test_choose_ties_prefer_lower_harm_then_larger_alpha():
    pts = [_p(0.3, 0.7, 0.05, 0.9), _p(0.3, 0.8, 0.08, 0.9), _p(0.4, 0.8, 0.05, 0.9)]
    best, _ = choose(pts, Limits.around({'harmful_rate': 0.1}, 0.0, None))
    assert (best.tau, best.alpha) == (0.3, 0.8) or best.harmful_rate == 0.05
    assert best.harmful_rate == 0.05 and best.alpha == 0.8 and best.tau == 0.4


def test_choose_when_nothing_is_feasible():
    pts = [_p(0.3, 0.9, 0.5, 0.9), _p(0.3, 0.6, 0.3, 0.4)]
    best, ok = choose(pts, Limits.around({'harmful_rate': 0.0}, 0.02, None))
    assert not ok and best.alpha == 0.6


def test_choose_needs_scores():
    with pytest.raises(SafemergeError):
        choose([GridPoint(0.3, 0.8, [])], Limits(0.02))


def test_rank_points_puts_feasible_by_utility_then_infeasible_by_harm():
    pts = [_p(0.3, 0.9, 0.50, 0.95), _p(0.3, 0.5, 0.10, 0.60), _p(0.3, 0.7, 0.12, 0.80), _p(0.3, 0.8, 0.30, 0.90)]
    order = rank_points(pts, Limits.around({'harmful_rate': 0.10}, 0.03, None))
    assert [p.alpha for p in order] == [0.7, 0.5, 0.8, 0.9]



def test_screen_promotion_is_optimistic_by_one_standard_error_and_counts_distinct_merges():
    """A point one answer above the harm limit on a 32-item screen is promoted; twins (same layers, same α) count
    once among the finalists; the final choice stays strict."""
    limits = Limits.around({"harmful_rate": 0.24}, 0.03, None)  # 27%
    def pt(tau, alpha, merged, h, u):
        return GridPoint(tau, alpha, merged, harmful_rate=h, utility=u, n=[32, 24])
    near = pt(0.35, 0.7, ["a", "b"], 0.344, 0.25)  # 11/32: within one SE (8.4 points) of 27%
    far = pt(0.35, 0.9, ["a", "b"], 0.50, 0.30)  # 16/32: 23 points above, 2.6 SE
    safe = pt(0.35, 0.2, ["a", "b"], 0.25, 0.17)
    twin = pt(0.36, 0.2, ["a", "b"], 0.25, 0.17)  # the same model as ``safe``
    pts = [far, safe, twin, near]
    assert [p.alpha for p in rank_points(pts, limits)][:1] == [0.2]  # strict: ``near`` is infeasible
    leaders = distinct_leaders(pts, limits, 2)
    assert leaders == [near, safe]
    assert len(distinct_leaders(pts, limits, 4)) == 3  # ``twin`` never takes a finalist's place
    assert not limits.met(near) and limits.met(near, 1.0) and not limits.met(far, 1.0)


def test_screen_reads_over_refusal_optimistically_on_the_look_alike_screen():
    """The look-alike screen (50 of 250 items) is read like the harmful one: one standard error lower for
    promotion; the decision on the whole sets stays strict."""
    limits = Limits.around({"harmful_rate": 0.10, "over_refusal": 0.10}, 0.03, 0.05)  # 13%, 15%
    near = GridPoint(0.35, 0.5, ["a"], harmful_rate=0.10, utility=0.3, over_refusal=0.20, n=[32, 24, 50])
    far = GridPoint(0.35, 0.6, ["a"], harmful_rate=0.10, utility=0.3, over_refusal=0.40, n=[32, 24, 50])
    assert not limits.met(near) and limits.met(near, 1.0)  # 10/50: SE 5.7 points, 5 above the limit
    assert not limits.met(far, 1.0)
    assert limits.excess(far, 1.0) == pytest.approx(0.40 - (0.4 * 0.6 / 50) ** 0.5 - 0.15)

def _q(alpha, h, u, r):
    return GridPoint(tau=0.3, alpha=alpha, merged=["m"], harmful_rate=h, utility=u, over_refusal=r)


def test_over_refusal_is_a_constraint_of_the_choice():
    # aligned: 10% harmful, 20% over-refusal; margins 3 and 5 points
    limits = Limits.around({"harmful_rate": 0.10, "over_refusal": 0.20}, 0.03, 0.05)
    pts = [_q(0.5, 0.05, 0.90, 0.60), _q(0.7, 0.12, 0.80, 0.24), _q(0.9, 0.40, 0.95, 0.10)]
    best, ok = choose(pts, limits)
    assert ok and best.alpha == 0.7  # the most useful safe point over-refuses 60%: not allowed
    assert [p.feasible for p in pts] == [False, True, False]
    # without a benign set the over-refusal is not constrained
    best, _ = choose(pts, Limits.around({"harmful_rate": 0.10, "over_refusal": 0.20}, 0.03, None))
    assert best.alpha == 0.5


def test_nothing_feasible_picks_the_smallest_excess_over_both_limits():
    limits = Limits.around({"harmful_rate": 0.10, "over_refusal": 0.20}, 0.0, 0.0)
    pts = [_q(0.3, 0.05, 0.50, 0.90), _q(0.6, 0.20, 0.80, 0.25), _q(0.9, 0.50, 0.95, 0.10)]
    best, ok = choose(pts, limits)
    assert not ok and best.alpha == 0.6  # excess 0.10 + 0.05, against 0.70 and 0.40
    assert limits.excess(best) == pytest.approx(0.15)


def test_neighbours_on_the_alpha_grid():
    assert DEFAULT_ALPHAS[0] <= 0.1 and DEFAULT_ALPHAS[-1] >= 0.9  # the whole of (0, 1), issue 17
    assert neighbours(0.5, DEFAULT_ALPHAS) == [0.4, 0.6]
    assert neighbours(0.1, DEFAULT_ALPHAS) == [0.2] and neighbours(0.9, DEFAULT_ALPHAS) == [0.8]


def test_coarse_to_fine_screens_refines_and_decides_on_the_full_sets(tmp_path, monkeypatch):
    """With a synthetic evaluator (harm and utility both rise with α and with the number of merged layers
    left out): coarse α on the screen, neighbours of the best, finalists on the whole validation sets."""
    scores = [LayerScore(f"m{i}", i, "q", rho, 1.0, 1.0) for i, rho in enumerate((0.1, 0.2, 0.3, 0.4))]
    monkeypatch.setattr(search_module, "scan", lambda *a, **k: scores)
    merges: dict[str, tuple[float, float]] = {}

    def fake_merge(models, out, *, settings, **_):
        out.mkdir(parents=True)
        merges[str(out)] = (settings.tau, settings.alpha)

    monkeypatch.setattr(search_module, "safemerge_adapters", fake_merge)
    calls: list[tuple[str | None, object]] = []

    def fake_eval(model, *, adapter=None, limits=None, **_):
        calls.append((str(adapter) if adapter else None, limits))
        if adapter is None:
            h, u = 0.10, 0.2
        elif str(adapter) == "task":
            h, u = 0.9, 0.9
        else:
            tau, alpha = merges[str(adapter)]
            kept = sum(s.rho >= tau for s in scores) / len(scores)  # layers left with the pure task update
            h, u = min(1.0, 0.1 + alpha ** 2 * 0.8 + 0.3 * kept), 0.2 + 0.7 * alpha
        n = (limits or {}).get("harmful", 168), (limits or {}).get("utility", 100)
        return {"harmful": {"harmful_rate": h, "n": n[0]}, "utility": {"accuracy": u, "n": n[1]}}

    monkeypatch.setattr(search_module, "evaluate_suites", fake_eval)
    res = autotune(SafeMergeModels(base="b", aligned="a", finetuned="task", safety="s"),
                   PromptSets(harmful="h", utility="u"), tmp_path,
                   search=SearchSettings(max_taus=4, screen=(32, 24, 50), finalists=3, harm_margin=0.03,
                                         extensions=False))
    screened = [p for p in res.points if p.rung == "screen"]
    full = [p for p in res.points if p.rung == "full"]
    assert len(full) == 3 and len(screened) > len(full)
    assert all(p.n == [168, 100] for p in full) and all(p.n == [32, 24] for p in screened)
    assert res.chosen in full and res.chosen.rung == "full"
    coarse = {0.1, 0.3, 0.5, 0.7, 0.9}
    assert coarse <= {p.alpha for p in res.points}
    assert {p.alpha for p in res.points} - coarse  # refined with α neighbours
    # the rule: harm ≤ 0.10 + 0.03 holds only with every layer merged and α = 0.1 (α = 0.2 gives 0.132)
    assert res.constraint_met and res.chosen.alpha == 0.1 and len(res.chosen.merged) == 4
    assert (tmp_path / "autotune.json").exists() and (tmp_path / "autotune.png").exists()
    # each distinct merged model is evaluated once per rung
    keys = [(a, tuple(sorted(l.items())) if l else None) for a, l in calls]
    assert len(keys) == len(set(keys))


def test_search_settings_are_checked_when_built_and_keep_alphas_sorted():
    s = SearchSettings(alphas=[0.9, 0.1, 0.5, 0.5], taus=[0.4, 0.2])
    assert s.alphas == (0.1, 0.5, 0.9) and s.taus == (0.2, 0.4)
    assert s.coarse_alphas() == [0.1, 0.9] and SearchSettings(screen=None, alphas=(0.1, 0.5, 0.9)).coarse_alphas() \
        == [0.1, 0.5, 0.9]
    assert SearchSettings().coarse_alphas() == [0.1, 0.3, 0.5, 0.7, 0.9]
    with pytest.raises(SafemergeError, match="--harm-margin"):
        SearchSettings(harm_margin=3)
    with pytest.raises(SafemergeError, match="--refusal-margin"):
        SearchSettings(refusal_margin=-0.1)
    with pytest.raises(SafemergeError, match=r"alphas must lie in \[0, 1\]"):
        SearchSettings(alphas=(0.5, 1.5))
    # a repair cache key sees only the grid fields that differ from the defaults
    assert SearchSettings(harm_margin=0.1).grid_overrides() == {}
    assert SearchSettings(max_taus=3, screen=(8, 8, 8)).grid_overrides() == {"max_taus": 3, "screen": (8, 8, 8)}
    for bad in ((8, 8), (8, 0, 8)):  # one count per screened suite: harmful, utility, benign look-alikes
        with pytest.raises(SafemergeError, match="the screen must be three positive item counts"):
            SearchSettings(screen=bad)


def test_prompt_sets_fill_missing_suites_and_keep_given_ones():
    given = PromptSets(harmful=[], utility="u")  # an empty record list is given, not missing
    filled = given.filled(PromptSets("h", "b", "x"))
    assert filled == PromptSets([], "b", "u") and filled.as_suites() == {"harmful": [], "benign": "b", "utility": "u"}


def test_autotune_needs_harmful_and_utility_validation_sets(tmp_path):
    with pytest.raises(SafemergeError, match="validation"):
        autotune(SafeMergeModels("b", "a", "t", "s"), PromptSets(harmful="h"), tmp_path)


def test_tau_alpha_numbers_pass_and_auto_needs_validation_sets(tmp_path, monkeypatch):
    from safemerge.cli.tau_alpha import autotune_work_dir, parse_tau_alpha, resolve_tau_alpha

    models = SafeMergeModels("b", "a", "t", "s")
    assert parse_tau_alpha("auto", "0.7") == (None, 0.7)
    assert resolve_tau_alpha("0.3", 0.8, models, PromptSets()) == (0.3, 0.8, None)
    with pytest.raises(SafemergeError, match="need validation prompts"):
        resolve_tau_alpha("auto", 0.8, models, PromptSets(harmful="h"))
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path))
    key = autotune_work_dir(models, PromptSets("h", None, "u"), "keyword")
    assert key.parent == tmp_path / "autotune" and key == autotune_work_dir(models, PromptSets("h", None, "u"),
                                                                             "keyword")
    assert key != autotune_work_dir(models, PromptSets("h", "b", "u"), "keyword")

def test_late_block_extension_is_searched_and_written(tmp_path, monkeypatch):
    """The late-block candidates (last sixth / third of the blocks, gain 1, 1.5 and 2) join the grid; when one wins, its
    gain and min_layer reach the merge and the description; the paper's points stay on the grid."""
    scores = [LayerScore(f"m{i}", i, "q", 0.1 + 0.01 * i, 1.0, 1.0) for i in range(12)]
    monkeypatch.setattr(search_module, "scan", lambda *a, **k: scores)
    merges: dict[str, dict] = {}

    def fake_merge(models, out, *, settings, **_):
        out.mkdir(parents=True)
        merges[str(out)] = asdict(settings)

    monkeypatch.setattr(search_module, "safemerge_adapters", fake_merge)

    def fake_eval(model, *, adapter=None, limits=None, **_):
        if adapter is None:
            h, u = 0.10, 0.2
        elif str(adapter) == "task":
            h, u = 0.4, 0.9
        else:
            kw = merges[str(adapter)]
            late = kw["min_layer"] >= 10  # the harm sits in the last two blocks, the skill everywhere else
            w_f, w_s = kw["alpha"], kw["safety_gain"] * (1 - kw["alpha"])
            h = 0.4 - (0.3 * min(1.0, w_s) if late else 0.2 * (1 - w_f))
            u = 0.9 - (0.05 if late else 0.7 * (1 - w_f))
        n = (limits or {}).get("harmful", 168), (limits or {}).get("utility", 100)
        return {"harmful": {"harmful_rate": h, "n": n[0]}, "utility": {"accuracy": u, "n": n[1]}}

    monkeypatch.setattr(search_module, "evaluate_suites", fake_eval)
    models, sets = SafeMergeModels(base="b", aligned="a", finetuned="task", safety="s"), PromptSets(harmful="h",
                                                                                                    utility="u")
    res = autotune(models, sets, tmp_path, search=SearchSettings(max_taus=3, screen=(32, 24, 50), finalists=3))
    assert late_block_starts(scores) == [8, 10]
    late = [p for p in res.points if not p.paper_rule]
    assert {(p.min_layer, p.safety_gain) for p in late} == {(m, g) for m in (8, 10) for g in LATE_GAINS}
    assert set(LATE_GAINS) == {1.0, 1.5, 2.0}
    assert all(set(p.merged) == {f"m{i}" for i in range(p.min_layer, 12)} for p in late)
    assert any(p.paper_rule for p in res.points)
    c = res.chosen
    assert res.constraint_met and c.min_layer == 10 and c.safety_gain == 2.0
    assert res.merge_kwargs() == {"tau": LATE_TAU, "alpha": c.alpha, "safety_gain": 2.0, "min_layer": 10}
    assert res.describe().startswith("blocks ≥ 10, α = ") and res.describe().endswith("g = 2")
    written = [kw for kw in merges.values() if kw["min_layer"] == 10 and kw["safety_gain"] == 2.0]
    assert written and all(kw["tau"] == LATE_TAU for kw in written)
    off = autotune(models, sets, tmp_path / "paper",
                   search=SearchSettings(max_taus=3, screen=(32, 24, 50), finalists=3, extensions=False))
    assert all(p.paper_rule for p in off.points)
