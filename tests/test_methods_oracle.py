"""Oracle tests: every merge method against mergekit 0.1.5's in-memory ``merge_tensors``.

Deterministic methods must agree within 1e-6 (fp32); the stochastic ones (DARE, DELLA) draw the
same Bernoulli sequence as mergekit, so with ``torch.manual_seed(s)`` on mergekit's side and
``torch.Generator().manual_seed(s)`` on ours they must agree as well.
"""
from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch

from safemerge.methods import get_method

mk_api = pytest.importorskip("mergekit.merge_methods.api")

SHAPES = [(37,), (64, 48), (1000, 64)]  # a bias, a projection, an embedding-like matrix


def call_ours(name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, per_model: dict, params: dict,
              seed: int | None) -> torch.Tensor:
    """Call our registered function the way the engine does: defaults filled in."""
    method = get_method(name)
    full = {p.name: p.default for p in method.global_params}
    full.update(params)
    pm = {p.name: list(per_model.get(p.name, [p.default] * len(tensors))) for p in method.per_model_params}
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return method.fn(tensors, base, per_model=pm, params=full, generator=gen)


def call_mergekit(name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, per_model: dict, params: dict,
                  seed: int | None) -> torch.Tensor:
    """mergekit: the base is the last input, flagged by ``base_index``."""
    parameters: dict[str, Any] = {**params, **per_model}
    if seed is not None:
        torch.manual_seed(seed)
    if base is None:
        return mk_api.merge_tensors(list(tensors), name, parameters=parameters)
    return mk_api.merge_tensors([*tensors, base], name, parameters=parameters, base_index=len(tensors))


W3 = {"weight": [0.2, 0.5, 0.9]}
W3N = {"weight": [0.7, -0.4, 1.1]}
D3 = {"density": [0.3, 0.5, 0.9]}

# (method, number of non-base models (or inputs), uses base, per_model, params, seed)
CASES: list[tuple[str, int, bool, dict, dict, int | None]] = [
    ("linear", 3, False, W3, {}, None),
    ("linear", 3, False, W3N, {"normalize": False}, None),
    ("task_arithmetic", 3, True, W3N, {}, None),
    ("task_arithmetic", 3, True, W3, {"lambda": 0.7, "normalize": True}, None),
    ("ties", 3, True, {**W3, **D3}, {}, None),
    ("ties", 3, True, {**W3N, **D3}, {"normalize": False, "rescale": True, "lambda": 1.5}, None),
    ("ties", 2, True, {"weight": [1.0, 1.0]}, {"int8_mask": True}, None),
    ("breadcrumbs", 3, True, {**W3, **D3, "gamma": [0.01, 0.1, 0.0]}, {}, None),
    ("breadcrumbs_ties", 3, True, {**W3, **D3, "gamma": [0.05, 0.2, 0.01]}, {"normalize": True}, None),
    ("breadcrumbs", 2, True, {"weight": [1.0, 0.5], "density": [0.9, 0.95], "gamma": [0.3, 0.5]}, {"rescale": True},
     None),
    ("dare_linear", 3, True, {**W3, **D3}, {}, 11),
    ("dare_linear", 3, True, {**W3, **D3}, {"rescale": False, "normalize": True}, 12),
    ("dare_ties", 3, True, {**W3N, **D3}, {}, 13),
    ("della", 3, True, {**W3, "density": [0.3, 0.5, 0.7], "epsilon": [0.1, 0.2, 0.05]}, {}, 14),
    ("della_linear", 3, True, {**W3, "density": [0.3, 0.5, 0.7]}, {"lambda": 1.3}, 15),
    ("slerp", 1, True, {}, {"t": 0.3}, None),
    ("slerp", 1, True, {}, {"t": 1.0}, None),
    ("nuslerp", 2, True, {"weight": [0.3, 0.6]}, {}, None),
    ("nuslerp", 2, False, {"weight": [0.3, 0.6]}, {"nuslerp_flatten": False}, None),
    ("nuslerp", 2, False, {"weight": [1.0, 2.0]}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, None),
    ("nuslerp", 2, True, {"weight": [1.0, -1.0]}, {"nuslerp_flatten": False}, None),
    ("multislerp", 3, True, {"weight": [0.3, 0.6, 1.0]}, {}, None),
    ("multislerp", 3, False, {"weight": [0.3, 0.6, 1.0]}, {"normalize_weights": False}, None),
    ("karcher", 4, False, {}, {}, None),
    ("karcher", 3, False, {}, {"max_iter": 3, "tol": 1e-3}, None),
    ("model_stock", 3, True, {}, {}, None),
    ("model_stock", 2, True, {}, {"filter_wise": True}, None),
    ("sce", 3, True, {}, {}, None),
    ("sce", 3, True, {}, {"select_topk": 0.3}, None),
    ("nearswap", 1, True, {}, {"t": 0.02}, None),
    ("arcee_fusion", 1, True, {}, {}, None),
    ("ram", 3, True, {}, {}, None),
    ("ram", 3, True, {}, {"epsilon": 0.05}, None),
    ("ramplus_tl", 3, True, {}, {"epsilon": 0.05}, None),
    ("ramplus_tl", 2, True, {}, {"r": 0.5, "alpha": 1.0, "epsilon": 0.03}, None),
    ("passthrough", 1, False, {"scale": [2.0]}, {}, None),
    ("passthrough", 1, False, {}, {}, None),
]


def _inputs(shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``n`` models whose task vectors have pairwise-distinct magnitudes.

    Distinct magnitudes matter: with ties at a top-k boundary mergekit's (unstable) sort picks
    an arbitrary element while we pick by index, and both answers are valid.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    numel = base.numel()
    out = []
    for _ in range(n):
        mags = (torch.randperm(numel, generator=g).to(torch.float32) + 1) * (0.1 / numel)
        signs = torch.randint(0, 2, (numel,), generator=g).to(torch.float32) * 2 - 1
        out.append(base + (mags * signs).reshape(shape))
    return base, out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[4].items()) or 'default'}-n{c[1]}")
def test_matches_mergekit(shape: tuple[int, ...], case: tuple) -> None:
    name, n, uses_base, per_model, params, seed = case
    base, tensors = _inputs(shape, n, seed=zlib.crc32(f"{name}{shape}".encode()) % 1000)
    b = base if uses_base else None
    before = [t.clone() for t in tensors] + [base.clone()]
    ours = call_ours(name, tensors, b, per_model, params, seed)
    theirs = call_mergekit(name, tensors, b, per_model, params, seed)
    assert ours.dtype == torch.float32 and ours.shape == base.shape
    # multislerp: mergekit evaluates a tangent vector that is exactly zero in exact arithmetic and
    # adds its float32 rounding noise (a few ulp of the result); everything else agrees to 1e-6.
    rtol = 3e-6 if name == "multislerp" else 1e-6
    torch.testing.assert_close(ours, theirs.float(), rtol=rtol, atol=1e-6)
    # inputs are never modified
    for t, t0 in zip([*tensors, base], before):
        assert torch.equal(t, t0)


def test_linear_with_base_in_tensors_matches_mergekit_base_index() -> None:
    """mergekit's linear averages the base like any input (base policy IGNORED)."""
    base, tensors = _inputs((20, 8), 2, seed=3)
    ours = call_ours("linear", [*tensors, base], None, {"weight": [1.0, 2.0, 1.0]}, {}, None)
    theirs = mk_api.merge_tensors([*tensors, base], "linear", parameters={"weight": [1.0, 2.0, 1.0]}, base_index=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, (tensors[0] + 2 * tensors[1] + base) / 4, rtol=1e-6, atol=1e-6)


def test_zero_non_base_models_returns_base() -> None:
    base, _ = _inputs((9, 4), 0, seed=1)
    for name in ("task_arithmetic", "ties", "dare_ties", "sce"):
        out = call_ours(name, [], base, {}, {}, 0)
        assert torch.equal(out, base)
        assert torch.equal(call_mergekit(name, [], base, {}, {}, 0), base)


def test_edge_cases_match_mergekit() -> None:
    """Degenerate geometry: collinear slerp, zero task vectors, antipodal nuslerp, karcher zeros."""
    base, (a,) = _inputs((50,), 1, seed=5)
    # slerp of collinear tensors falls back to lerp
    cases = [
        ("slerp", [2.0 * base], base, {}, {"t": 0.25}),
        ("slerp", [-base], base, {}, {"t": 0.25}),
        ("slerp", [torch.zeros_like(base)], base, {}, {"t": 0.6}),
        ("nuslerp", [-a, a], None, {"weight": [1.0, 1.0]}, {}),
        ("nuslerp", [a, 3 * a], None, {"weight": [1.0, 0.0]}, {"nuslerp_flatten": False}),
        ("karcher", [torch.zeros_like(a), a, 2 * a], None, {}, {}),
        ("karcher", [torch.zeros_like(a), torch.zeros_like(a)], None, {}, {}),
        ("model_stock", [base + (a - base), base - (a - base)], base, {}, {}),  # cos = -1 → t = 0
        ("ties", [base.clone(), base.clone()], base, {"weight": [1.0, 1.0], "density": [0.5, 0.5]}, {}),
        ("sce", [base.clone(), a], base, {}, {"select_topk": 0.5}),
        ("multislerp", [a, -a], None, {"weight": [1.0, 1.0]}, {}),
        ("multislerp", [a], base, {"weight": [1.0]}, {}),
        ("nearswap", [base.clone()], base, {}, {"t": 0.5}),
    ]
    for name, tensors, b, pm, pa in cases:
        ours = call_ours(name, tensors, b, pm, pa, None)
        theirs = call_mergekit(name, tensors, b, pm, pa, None)
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6, msg=lambda m, n=name,
                                   p=pa: f"{n} {p}: {m}")


def test_ties_breaks_exact_ties_like_mergekit() -> None:
    """Quantised weights produce many exactly equal |δ| at the top-k cut-off; which of them
    survive must match mergekit (whose unstable sort decides), not just the count."""
    import torch
    from mergekit.sparsify import magnitude as mk_magnitude
    from mergekit.sparsify import magnitude_outliers as mk_outliers

    from safemerge.methods.sparsify import magnitude, magnitude_outliers

    g = torch.Generator().manual_seed(0)
    delta = (torch.randint(-40, 41, (300, 257), generator=g).float() / 64.0)  # a coarse grid: ties everywhere
    for density in (0.1, 0.37, 0.5, 0.9):
        assert torch.equal(magnitude(delta, density, tie_break="mergekit"), mk_magnitude(delta, density))
        assert torch.equal(magnitude_outliers(delta, density, 0.05, tie_break="mergekit"),
                           mk_outliers(delta, density, gamma=0.05))
    for density in (0.1, 0.37, 0.5, 0.9):  # default: same count, ties ordered by index
        ours = magnitude(delta, density)
        assert int((ours != 0).sum()) == int((mk_magnitude(delta, density) != 0).sum())


HALF = [torch.float16, torch.bfloat16]


def _case_id(c: tuple) -> str:
    return f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[4].items()) or 'default'}-n{c[1]}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mergekit_arithmetic_matches_mergekit_in_half_precision(case: tuple, dtype: torch.dtype) -> None:
    """``--mergekit-arithmetic``: what the engine computes for half-precision inputs equals
    mergekit's ``merge_tensors(..., dtype=…)`` bit for bit."""
    from types import SimpleNamespace

    from safemerge.engine.run import _mergekit_arithmetic

    name, n, uses_base, per_model, params, seed = case
    base, tensors = _inputs((64, 48), n, seed=zlib.crc32(f"{name}half".encode()) % 1000)
    base, tensors = base.to(dtype), [t.to(dtype) for t in tensors]
    method = get_method(name)
    full = {p.name: p.default for p in method.global_params} | params
    pm = {p.name: list(per_model.get(p.name, [p.default] * n)) for p in method.per_model_params}
    plan, job = SimpleNamespace(method=method), SimpleNamespace(per_model=pm, params=full)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ours = _mergekit_arithmetic(plan, job, list(tensors), base if uses_base else None, gen)
    if seed is not None:
        torch.manual_seed(seed)
    inputs = [*tensors, base] if uses_base else list(tensors)
    theirs = mk_api.merge_tensors(inputs, name, parameters={**params, **per_model},
                                  base_index=n if uses_base else None, dtype=dtype)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
