"""How mergekit 0.1.5 passes the base model to each method, established by running its full
YAML pipeline (``run_merge``) on tiny Llama models — the facts ``docs/methods.md`` ("How inputs
are passed") states and the engine relies on. Each case also checks that calling our function
with the documented convention reproduces mergekit's output tensor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from safemerge.methods import get_method

pytest.importorskip("mergekit")

TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model, save_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("methods_contract")
    tok = build_tokenizer()
    paths = {}
    for i, name in enumerate(["base", "a", "b"]):
        model = make_tiny_model("llama", seed=0)
        if name != "base":
            perturb_model(model, seed=i, scale=0.05)
        paths[name] = save_model(model, root / name, tokenizer=tok)
    return paths


def _load(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))[TENSOR].float()


def _mergekit(config: str, models: dict[str, Path], out: Path) -> torch.Tensor:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = config
    for name, path in models.items():
        text = text.replace(f"@{name}", str(path))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), MergeOptions(copy_tokenizer=False,
                                                                                              quiet=True))
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_file(str(f)))
    return merged[TENSOR].float()


def _ours(name: str, tensors, base, per_model=None, params=None) -> torch.Tensor:
    m = get_method(name)
    full = {p.name: p.default for p in m.global_params}
    full.update(params or {})
    pm = {p.name: list((per_model or {}).get(p.name, [p.default] * len(tensors))) for p in m.per_model_params}
    return m.fn(tensors, base, per_model=pm, params=full, generator=None)


def test_linear_averages_an_auto_added_base(models, tmp_path) -> None:
    cfg = "merge_method: linear\nbase_model: @base\nparameters: {weight: 1.0}\nmodels:\n  - model: @a\n  - model: @b\n"
    got = _mergekit(cfg, models, tmp_path / "out")
    base, a, b = (_load(models[k]) for k in ("base", "a", "b"))
    assert get_method("linear").extra["base_in_tensors"]
    ours = _ours("linear", [a, b, base], None, {"weight": [1.0, 1.0, 1.0]})  # base appended last
    torch.testing.assert_close(ours, got, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, (a + b + base) / 3, rtol=1e-5, atol=1e-6)


def test_linear_auto_added_base_without_global_weight_fails(models, tmp_path) -> None:
    cfg = (
        "merge_method: linear\nbase_model: @base\nmodels:\n"
        "  - model: @a\n    parameters: {weight: 1.0}\n  - model: @b\n    parameters: {weight: 2.0}\n"
    )
    with pytest.raises(Exception, match="Missing required parameter weight"):
        _mergekit(cfg, models, tmp_path / "out")


def test_karcher_includes_the_base(models, tmp_path) -> None:
    got = _mergekit("merge_method: karcher\nbase_model: @base\nmodels:\n  - model: @a\n  - model: @b\n", models,
                    tmp_path / "out")
    base, a, b = (_load(models[k]) for k in ("base", "a", "b"))
    torch.testing.assert_close(_ours("karcher", [a, b, base], None), got, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_ours("karcher", [a, b], None), got, rtol=1e-6, atol=1e-6)


def test_passthrough_rejects_a_second_input_from_base(models, tmp_path) -> None:
    with pytest.raises(Exception, match="exactly 1 inputs"):
        _mergekit("merge_method: passthrough\nbase_model: @base\nmodels:\n  - model: @a\n", models, tmp_path / "out")


def test_slerp_base_is_t0_endpoint(models, tmp_path) -> None:
    got = _mergekit("merge_method: slerp\nbase_model: @base\nparameters: {t: 0.3}\nmodels:\n  - model: @a\n", models,
                    tmp_path / "out")
    base, a = _load(models["base"]), _load(models["a"])
    torch.testing.assert_close(_ours("slerp", [a], base, params={"t": 0.3}), got, rtol=1e-6, atol=1e-6)


def test_nuslerp_with_unlisted_base_works_on_task_vectors(models, tmp_path) -> None:
    cfg = (
        "merge_method: nuslerp\nbase_model: @base\nmodels:\n"
        "  - model: @a\n    parameters: {weight: 1.0}\n  - model: @b\n    parameters: {weight: 3.0}\n"
    )
    got = _mergekit(cfg, models, tmp_path / "out")
    base, a, b = (_load(models[k]) for k in ("base", "a", "b"))
    torch.testing.assert_close(_ours("nuslerp", [a, b], base, {"weight": [1.0, 3.0]}), got, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_ours("nuslerp", [a, b], None, {"weight": [1.0, 3.0]}), got, rtol=1e-6, atol=1e-6)


def test_ties_listed_base_contributes_nothing(models, tmp_path) -> None:
    cfg = (
        "merge_method: ties\nbase_model: @base\nmodels:\n"
        "  - model: @a\n    parameters: {weight: 0.5, density: 0.5}\n  - model: @base\n    parameters: {weight: 0.7}\n"
        "  - model: @b\n    parameters: {weight: 1.0, density: 0.3}\n"
    )
    got = _mergekit(cfg, models, tmp_path / "out")
    base, a, b = (_load(models[k]) for k in ("base", "a", "b"))
    ours = _ours("ties", [a, b], base, {"weight": [0.5, 1.0], "density": [0.5, 0.3]})
    torch.testing.assert_close(ours, got, rtol=1e-6, atol=1e-6)
