"""Properties of the merge methods that need no oracle: declared parameters vs mergekit's,
validation errors, statistics and reproducibility of the stochastic methods, analytic cases."""
from __future__ import annotations

import math

import pytest
import torch

from safemerge.errors import ConfigError, SafemergeError
from safemerge.methods import REQUIRED, all_methods, get_method
from safemerge.methods._tensor import rank_window_mask
from safemerge.methods.sparsify import della_magprune, magnitude, random_drop

MERGEKIT_METHODS = [
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "multislerp", "model_stock", "sce", "karcher",
    "nearswap", "passthrough",
]


def run(name: str, tensors, base=None, per_model=None, params=None, seed: int | None = None) -> torch.Tensor:
    method = get_method(name)
    full = {p.name: p.default for p in method.global_params}
    full.update(params or {})
    per_model = per_model or {}
    pm = {p.name: list(per_model.get(p.name, [p.default] * len(tensors))) for p in method.per_model_params}
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return method.fn(list(tensors), base, per_model=pm, params=full, generator=gen)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- declarations ------------------------------------------------------------------------------


def test_every_mergekit_method_is_registered() -> None:
    methods = all_methods()
    for name in MERGEKIT_METHODS:
        assert name in methods, name
        assert methods[name].reference, f"{name} has no paper reference"
        assert "base_in_tensors" in methods[name].extra


def test_parameters_match_mergekit_specs() -> None:
    """Names, scope (per-model vs global), defaults and required-ness equal mergekit 0.1.5's."""
    mk = pytest.importorskip("mergekit.merge_methods")
    from mergekit.merge_methods.base import ParameterScope

    for name in MERGEKIT_METHODS:
        spec = mk.get(name).spec
        ours = get_method(name)
        assert {p.name for p in ours.params} == {p.name for p in spec.parameters}, name
        for p in spec.parameters:
            q = ours.param(p.name)
            assert q is not None
            assert q.per_model == (p.scope != ParameterScope.SHARED), (name, p.name)
            assert q.required == p.required, (name, p.name)
            if not p.required:
                assert q.default == p.default, (name, p.name, q.default, p.default)


def test_base_policy_matches_mergekit_contract() -> None:
    mk = pytest.importorskip("mergekit.merge_methods")
    for name in MERGEKIT_METHODS:
        policy = mk.get(name).spec.contract.base.value
        ours = get_method(name)
        expected = {"required": "required", "optional": "optional", "ignored": "none"}[policy]
        assert ours.base == expected, name
        assert ours.extra["base_in_tensors"] == (policy == "ignored"), name


@pytest.mark.parametrize(
    "method,param,value",
    [
        ("ties", "density", 0.0),
        ("ties", "density", 1.5),
        ("dare_ties", "density", -0.1),
        ("slerp", "t", 1.2),
        ("slerp", "t", -0.1),
        ("breadcrumbs", "gamma", 2.0),
        ("karcher", "max_iter", 2.5),
        ("sce", "select_topk", 0.0),
        ("linear", "normalize", "yes"),
        ("nearswap", "t", -1.0),
        ("task_arithmetic", "lambda", float("nan")),
    ],
)
def test_out_of_range_parameters_raise_config_error(method: str, param: str, value) -> None:
    p = get_method(method).param(param)
    assert p is not None
    with pytest.raises(ConfigError) as exc:
        p.check(value, f"{method}.parameters")
    assert param in exc.value.message and exc.value.hint


def test_required_parameters() -> None:
    required = {n: {p.name for p in get_method(n).params if p.default is REQUIRED} for n in MERGEKIT_METHODS}
    assert required["linear"] == {"weight"}
    assert required["ties"] == {"weight"}
    assert required["slerp"] == {"t"} and required["nearswap"] == {"t"}
    assert required["sce"] == set() and required["karcher"] == set() and required["passthrough"] == set()


def test_missing_weight_raises_config_error() -> None:
    base, a = randn(8, seed=1), randn(8, seed=2)
    m = get_method("ties")
    with pytest.raises(ConfigError, match="weight"):
        m.fn([a], base, per_model={"density": [1.0]}, params={"normalize": True, "lambda": 1.0}, generator=None)
    with pytest.raises(ConfigError, match="weight"):
        get_method("linear").fn([a, base], None, per_model={"weight": [1.0, None]}, params={"normalize": True},
                                generator=None)


@pytest.mark.parametrize(
    "name,n,with_base",
    [("slerp", 2, True), ("slerp", 1, False), ("passthrough", 2, False), ("model_stock", 1, True),
     ("nuslerp", 3, False), ("nearswap", 2, True), ("ties", 1, False)],
)
def test_wrong_number_of_inputs_raises_config_error(name: str, n: int, with_base: bool) -> None:
    ts = [randn(6, seed=i) for i in range(n)]
    with pytest.raises(ConfigError):
        run(name, ts, randn(6, seed=9) if with_base else None, {"weight": [1.0] * n}, {"t": 0.5})


def test_shape_mismatch_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="shape"):
        run("linear", [randn(4), randn(5)], None, {"weight": [1.0, 1.0]})


def test_linear_weights_summing_to_zero() -> None:
    a, b = randn(10, seed=1), randn(10, seed=2)
    with pytest.raises(ConfigError, match="sum to 0"):
        run("linear", [a, b], None, {"weight": [1.0, -1.0]})
    torch.testing.assert_close(run("linear", [a, b], None, {"weight": [1.0, -1.0]}, {"normalize": False}), a - b)
    # task-vector methods fall back to divisor 1, like mergekit
    base = randn(10, seed=3)
    out = run("task_arithmetic", [a, b], base, {"weight": [1.0, -1.0]}, {"normalize": True})
    torch.testing.assert_close(out, base + (a - base) - (b - base))


def test_della_epsilon_outside_range_raises() -> None:
    base, a = randn(16, seed=1), randn(16, seed=2)
    with pytest.raises(ConfigError, match="epsilon"):
        run("della", [a], base, {"weight": [1.0], "density": [0.9], "epsilon": [0.15]}, seed=0)


def test_multislerp_antipodal_three_inputs_raises() -> None:
    a = randn(12, seed=4)
    with pytest.raises(SafemergeError):
        run("multislerp", [a, -a, a * 0], None, {"weight": [1.0, 1.0, 1.0]})


# --- generic properties ------------------------------------------------------------------------


def _call_any(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, list, torch.Tensor]:
    base = randn(24, 16, seed=100).to(dtype)
    n = {"slerp": 1, "nearswap": 1, "passthrough": 1, "nuslerp": 2}.get(name, 3)
    ts = [(base.float() + 0.1 * randn(24, 16, seed=i)).to(dtype) for i in range(n)]
    m = get_method(name)
    b = None if m.extra["base_in_tensors"] else base
    pm = {"weight": [0.5 + 0.25 * i for i in range(n)], "density": [0.5] * n}
    return run(name, ts, b, pm, {"t": 0.4}, seed=seed), ts, base


@pytest.mark.parametrize("name", MERGEKIT_METHODS)
def test_float32_output_deterministic_and_inputs_untouched(name: str) -> None:
    out1, ts, base = _call_any(name, torch.bfloat16, seed=7)
    snapshot = [t.clone() for t in ts] + [base.clone()]
    out2, ts2, _ = _call_any(name, torch.bfloat16, seed=7)
    assert out1.dtype == torch.float32 and out1.shape == (24, 16)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2), "same inputs + seed must give identical bytes"
    for t, t0 in zip([*ts, base], snapshot):
        assert torch.equal(t, t0)
    assert all(out1.data_ptr() != t.data_ptr() for t in ts), "methods never return an input object"


# --- stochastic methods ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_stochastic_methods_reproducible_per_seed(name: str) -> None:
    base = randn(64, 32, seed=1)
    ts = [base + 0.1 * randn(64, 32, seed=i + 2) for i in range(3)]
    pm = {"weight": [1.0, 0.5, 0.25], "density": [0.4, 0.5, 0.6]}
    assert get_method(name).stochastic
    a = run(name, ts, base, pm, seed=123)
    b = run(name, ts, base, pm, seed=123)
    c = run(name, ts, base, pm, seed=124)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)


def test_dare_keep_rate_within_three_sigma() -> None:
    n = 200_000
    delta = randn(n, seed=5).abs_() + 0.01  # no zeros, so kept == nonzero
    for density in (0.1, 0.5, 0.9):
        out = random_drop(delta, density, rescale=False, generator=torch.Generator().manual_seed(1))
        kept = (out != 0).sum().item() / n
        sigma = math.sqrt(density * (1 - density) / n)
        assert abs(kept - density) < 3 * sigma, (density, kept)
        torch.testing.assert_close(out[out != 0], delta[out != 0])  # survivors untouched


def test_dare_rescale_restores_l1_norm() -> None:
    delta = randn(300, 50, seed=6)
    out = random_drop(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    kept = out != 0
    ratio = out[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # one common factor ≈ 1/density
    assert abs(ratio[0].item() - 1 / 0.3) < 0.1


def test_della_keep_probability_grows_with_magnitude_rank() -> None:
    rows, cols, density, eps = 400, 200, 0.5, 0.2
    delta = randn(rows, cols, seed=7)
    out = della_magprune(delta, density, eps, rescale=False, generator=torch.Generator().manual_seed(3))
    kept = out != 0
    assert abs(kept.float().mean().item() - density) < 3 * math.sqrt(0.25 / (rows * cols))
    order = delta.abs().argsort(dim=1)
    kept_sorted = kept.gather(1, order).float().mean(dim=0)  # keep-rate by rank
    low, high = kept_sorted[: cols // 10].mean().item(), kept_sorted[-cols // 10 :].mean().item()
    # expected ≈ density − 0.9ε and density + 0.9ε
    assert abs(low - (density - 0.9 * eps)) < 0.02 and abs(high - (density + 0.9 * eps)) < 0.02
    res = della_magprune(delta, density, eps, rescale=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(res.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "stochastic,deterministic,params",
    [
        ("dare_linear", "task_arithmetic", {}),
        ("dare_ties", "ties", {"normalize": False}),
        ("della", "ties", {}),
        ("della_linear", "task_arithmetic", {}),
    ],
)
def test_density_one_reduces_to_deterministic_counterpart(stochastic: str, deterministic: str, params: dict) -> None:
    base = randn(40, 12, seed=8)
    ts = [base + 0.1 * randn(40, 12, seed=i + 20) for i in range(3)]
    pm = {"weight": [0.3, 0.7, 1.1], "density": [1.0, 1.0, 1.0]}
    a = run(stochastic, ts, base, pm, params, seed=0)
    b = run(deterministic, ts, base, pm, params)
    assert torch.equal(a, b)


# --- analytic cases ----------------------------------------------------------------------------


def test_ties_worked_example() -> None:
    """Trim (top-50 %), elect the sign of the weighted sum, average agreeing entries."""
    base = torch.zeros(4)
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])  # keep 3, 2
    t2 = torch.tensor([-4.0, 2.0, 1.0, 0.1])  # keep -4, 2
    out = run("ties", [t1, t2], base, {"weight": [1.0, 1.0], "density": [0.5, 0.5]})
    # entry0: 3 + (-4) = -1 → sign −, only t2 agrees → -4 ; entry1: only t2 (2) ; entry2: none → 0 ;
    # entry3: only t1 (2)
    torch.testing.assert_close(out, torch.tensor([-4.0, 2.0, 0.0, 2.0]))


def test_slerp_endpoints_and_orthogonal_midpoint() -> None:
    base, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(run("slerp", [other], base, params={"t": 0.0}), base)
    torch.testing.assert_close(run("slerp", [other], base, params={"t": 1.0}), other)
    s = math.sqrt(0.5)
    torch.testing.assert_close(run("slerp", [other], base, params={"t": 0.5}), torch.tensor([s, s]))


def test_model_stock_ratio_formula() -> None:
    """Two orthogonal task vectors of equal norm: cos = 0 → t = 0 → the base."""
    base = torch.ones(4)
    a, b = base + torch.tensor([1.0, 0, 0, 0]), base + torch.tensor([0, 1.0, 0, 0])
    torch.testing.assert_close(run("model_stock", [a, b], base), base)
    # identical task vectors: cos = 1 → t = 1 → the average
    torch.testing.assert_close(run("model_stock", [a, a.clone()], base), a)


def test_nearswap_clamp() -> None:
    base = torch.tensor([0.0, 0.0, 0.0])
    other = torch.tensor([0.05, 0.5, 5.0])
    out = run("nearswap", [other], base, params={"t": 0.1})
    # |Δ| = .05 < t → fully swapped; .5 → moves by t/|Δ| = 0.2; 5 → 0.02
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, 0.1]))


def test_karcher_of_scaled_copies_is_the_mean_norm_direction() -> None:
    a = randn(30, seed=9)
    out = run("karcher", [a, 3 * a])
    torch.testing.assert_close(out, 2 * a, rtol=1e-5, atol=1e-6)


# --- top-k selection ---------------------------------------------------------------------------


def test_rank_window_mask_exact_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 5, (1000,), generator=g).float()  # many ties
    order = torch.sort(values, stable=True).indices
    for start, count in [(0, 10), (100, 1), (995, 5), (250, 500), (0, 1000), (1000, 0), (3, 0)]:
        mask = rank_window_mask(values, start, count)
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[order[start : start + count]] = True
        assert torch.equal(mask, expected), (start, count)


def test_magnitude_keeps_exactly_k_and_the_largest() -> None:
    delta = randn(50, 40, seed=11)
    out = magnitude(delta, 0.25)
    kept = out != 0
    assert kept.sum().item() == int(0.25 * delta.numel())
    assert delta.abs()[kept].min() >= delta.abs()[~kept].max()
    assert (magnitude(delta, 1e-9) != 0).sum().item() == 1  # at least one survives


def test_kth_smallest_is_exact() -> None:
    """The bracketed selection equals torch.kthvalue, including heavy ties and extremes."""
    import torch

    from safemerge.methods._tensor import kth_smallest

    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(1 << 21, generator=g), torch.randint(0, 50, (3_000_000,), generator=g).float() / 7,
              torch.zeros(1 << 20)):
        for k in (1, 2, 1000, x.numel() // 2, 2 * x.numel() // 3, x.numel() - 1, x.numel()):
            assert torch.equal(kth_smallest(x, k), torch.kthvalue(x, k).values), k
