"""Adding a merge method is one decorated function (``@merge_method``) plus one test — this is that test's template.

A method declared with the decorator is usable from a YAML config at once: the engine validates its
declared parameters (default, range) and arity before reading a tensor, and runs it on every tensor.
"""
from __future__ import annotations

import pytest
import torch

from safemerge.errors import ConfigError
from safemerge.methods.registry import REGISTRY, Param, merge_method


@pytest.fixture()
def midpoint_method():
    """``θ = θ_base + s·(θ_1 − θ_base)`` — declared exactly as docs/architecture.md shows."""

    @merge_method("test_scaled_delta", params=(Param("s", 0.5, low=0.0, high=1.0, help="scale, e.g. 0.5"),),
                  base="required", min_models=1, max_models=1, reference="a test method", elementwise=True)
    def scaled_delta(tensors, base, *, per_model, params, generator=None):  # noqa: ANN001, ANN202
        return base + params["s"] * (tensors[0] - base)

    yield scaled_delta
    REGISTRY.pop("test_scaled_delta")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    root = tmp_path_factory.mktemp("decorated")
    model = make_tiny_model("llama", seed=0, hidden=32, layers=2)
    base = save_model(model, root / "base")
    perturb_model(model, seed=1, scale=0.02)
    return base, save_model(model, root / "other")


def _config(base, other, **params) -> dict:
    return {"merge_method": "test_scaled_delta", "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(other)}], "parameters": params}


def test_decorated_method_runs_on_the_engine(midpoint_method, two_models):
    from safemerge.engine.run import merge_in_memory
    from safemerge.io.checkpoint import Checkpoint

    base, other = two_models
    out = merge_in_memory(_config(base, other, s=0.25))
    b, o = Checkpoint(base), Checkpoint(other)
    assert set(out) == set(b.names())
    for name, t in out.items():
        torch.testing.assert_close(t, b.get(name) + 0.25 * (o.get(name) - b.get(name)), rtol=0, atol=1e-7)
    defaults = merge_in_memory(_config(base, other))  # s = 0.5, the declared default
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(defaults[name], (b.get(name) + o.get(name)) / 2, rtol=0, atol=1e-7)


def test_decorated_method_is_validated_from_its_declaration(midpoint_method, two_models):
    from safemerge.engine.run import merge_in_memory
    from safemerge.methods.catalog import get_method

    base, other = two_models
    with pytest.raises(ConfigError, match="outside"):
        merge_in_memory(_config(base, other, s=1.5))
    with pytest.raises(ConfigError, match="unknown parameter"):
        merge_in_memory(_config(base, other, t=0.5))
    method = get_method("test_scaled_delta")
    with pytest.raises(ConfigError, match="exactly 1"):
        method.fn([torch.ones(3), torch.ones(3)], torch.zeros(3), per_model={}, params={"s": 0.5})
    assert torch.equal(method.call([torch.ones(3)], torch.zeros(3)), torch.full((3,), 0.5))
