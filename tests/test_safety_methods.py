"""SafeLoRA, RESTA, MergeAlign (API and registered YAML methods) and a Qwen2 model with biases."""
from __future__ import annotations

import pytest
import torch
from safety_world import build_world, peft_deltas

from safemerge.io.checkpoint import Checkpoint
from safemerge.methods.similarity import rho_materialized
from safemerge.options import RunOptions
from safemerge.safety import api
from safemerge.safety.settings import SafeMergeModels, SafeMergeSettings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "qwen2")


def _C(world, module):
    base, al = Checkpoint(world.base), Checkpoint(world.aligned)
    V = al.get(f"{module}.weight") - base.get(f"{module}.weight")
    return V @ V.T / torch.linalg.vector_norm(V), V


@pytest.mark.parametrize("mode,tau,k", [("threshold", 0.5, None), ("threshold", 0.8, None), ("number", None, 3),
                                        ("number", None, 1)])
def test_safelora_projects_exactly_the_chosen_layers(world, tmp_path, mode, tau, k):
    kw = {"tau": tau} if tau is not None else {"num_layers": k}
    res = api.safelora(base=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "sl", mode=mode, **kw)
    ft = peft_deltas(world.aligned, world.ft)
    rhos = {}
    for m, d in ft.items():
        _, V = _C(world, m)
        rhos[m] = rho_materialized(V, d)
    if mode == "threshold":
        want = {m for m, r in rhos.items() if r <= tau}
    else:
        kth = sorted(rhos.values())[k - 1]
        want = {m for m, r in rhos.items() if r <= kth + 1e-9}
        assert len(want) == k
    assert set(res.projected) == want and want
    got = peft_deltas(world.aligned, tmp_path / "sl")
    for m, d in ft.items():
        C, _ = _C(world, m)
        expect = C @ d if m in want else d  # B ← C B once (unnormalised C), A unchanged
        torch.testing.assert_close(got[m], expect, rtol=1e-4, atol=1e-7)
    assert "projected" in (tmp_path / "sl" / "README.md").read_text()


def test_safelora_merge_into(world, tmp_path):
    res = api.safelora(base=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "m", mode="threshold",
                       tau=0.5, merge_into=world.aligned)
    ft = peft_deltas(world.aligned, world.ft)
    got, al = Checkpoint(tmp_path / "m"), Checkpoint(world.aligned)
    for m, d in ft.items():
        C, _ = _C(world, m)
        want = C @ d if m in res.projected else d
        torch.testing.assert_close(got.get(f"{m}.weight") - al.get(f"{m}.weight"), want, rtol=1e-4, atol=1e-6)


def test_safelora_mode_validation(world, tmp_path):
    from safemerge.errors import SafemergeError

    with pytest.raises(SafemergeError, match="mode"):
        api.safelora(base=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "x", mode="top")
    with pytest.raises(SafemergeError, match="num-layers"):
        api.safelora(base=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "x", mode="number",
                     num_layers=0)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("beta", [0.5, 1.0, -0.3])
def test_resta_equals_formula(world, tmp_path, beta):
    out = api.resta(unaligned=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "r", beta=beta)
    got, al, un = Checkpoint(out), Checkpoint(world.aligned), Checkpoint(world.base)
    ft = peft_deltas(world.aligned, world.ft)
    for n in al.names():
        m = n[: -len(".weight")]
        theta_ft = al.get(n) + ft[m] if m in ft else al.get(n)
        torch.testing.assert_close(got.get(n), theta_ft + beta * (al.get(n) - un.get(n)), rtol=1e-5, atol=1e-6)


def test_resta_with_dare(world, tmp_path):
    a = api.resta(unaligned=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "a", beta=0.5,
                  dare_density=0.5, options=RunOptions(seed=7))
    b = api.resta(unaligned=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "b", beta=0.5,
                  dare_density=0.5, options=RunOptions(seed=7))
    c = api.resta(unaligned=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "c", beta=0.5,
                  dare_density=0.5, options=RunOptions(seed=8))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    got, al, un = Checkpoint(a), Checkpoint(world.aligned), Checkpoint(world.base)
    ft = peft_deltas(world.aligned, world.ft)
    m = "model.layers.0.self_attn.v_proj"
    n = f"{m}.weight"
    kept = got.get(n) - al.get(n) - 0.5 * (al.get(n) - un.get(n))  # = DARE(δ)
    nz = kept.abs() > 1e-6
    assert 0.3 < nz.float().mean() < 0.7  # about half the entries survive
    torch.testing.assert_close(kept[nz], 2.0 * ft[m][nz], rtol=1e-3, atol=1e-5)  # survivors rescaled by 1/p


def test_mergealign_equals_formula(world, tmp_path):
    dom = f"{world.base}+{world.ft}"  # a "domain expert" fine-tuned from the pre-trained model
    out = api.mergealign(pretrained=world.base, domain=dom, aligned=world.aligned, out=tmp_path / "ma",
                         lambda_domain=0.7, lambda_aligned=0.4)
    got, pre, al = Checkpoint(out), Checkpoint(world.base), Checkpoint(world.aligned)
    ft = peft_deltas(world.base, world.ft)
    for n in pre.names():
        m = n[: -len(".weight")]
        d = pre.get(n) + ft[m] if m in ft else pre.get(n)
        want = pre.get(n) + 0.7 * (d - pre.get(n)) + 0.4 * (al.get(n) - pre.get(n))
        torch.testing.assert_close(got.get(n), want, rtol=1e-5, atol=1e-6)


def test_registered_methods_equal_their_formulas():
    from safemerge.methods.catalog import get_method

    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 16, generator=g)
    aligned = base + 0.1 * torch.randn(24, 16, generator=g)
    ft = aligned + 0.05 * torch.randn(24, 16, generator=g)
    safety = aligned + 0.05 * torch.randn(24, 16, generator=g)
    for name in ("safemerge", "safelora", "resta", "mergealign"):
        m = get_method(name)
        assert m.base == "required" and m.reference
    # RESTA / MergeAlign
    out = get_method("resta").call([aligned, ft], base, per_model={}, params={"beta": 0.7}, generator=None)
    torch.testing.assert_close(out, ft + 0.7 * (aligned - base))
    out = get_method("mergealign").call([aligned, ft], base, per_model={},
                                        params={"lambda_domain": 0.3, "lambda_aligned": 0.6}, generator=None)
    torch.testing.assert_close(out, base + 0.3 * (ft - base) + 0.6 * (aligned - base))
    # SafeMERGE: merged iff ρ < τ
    rho = rho_materialized(aligned - base, ft - aligned)
    lo = get_method("safemerge").call([aligned, ft, safety], base, per_model={}, params={"tau": rho + 0.01,
                                                                                         "alpha": 0.8}, generator=None)
    torch.testing.assert_close(lo, aligned + 0.8 * (ft - aligned) + 0.2 * (safety - aligned))
    hi = get_method("safemerge").call([aligned, ft, safety], base, per_model={}, params={"tau": rho - 0.01},
                                      generator=None)
    assert torch.equal(hi, ft)
    # SafeLoRA threshold: θ_aligned + C ΔW iff ρ ≤ τ
    V = aligned - base
    C = V @ V.T / torch.linalg.vector_norm(V)
    pr = get_method("safelora").call([aligned, ft], base, per_model={}, params={"tau": rho + 0.01}, generator=None)
    torch.testing.assert_close(pr, aligned + C @ (ft - aligned), rtol=1e-5, atol=1e-6)
    assert torch.equal(get_method("safelora").call([aligned, ft], base, per_model={}, params={"tau": rho - 0.01},
                                                   generator=None), ft)
    # 1-D tensors (biases, norms) keep the fine-tuned value
    b1 = torch.randn(8, generator=g)
    assert torch.equal(get_method("safemerge").call([b1, b1 + 1, b1 - 1], b1 * 0, per_model={}, params={"tau": 1.0},
                                                    generator=None), b1 + 1)
    # RESTA with DARE is reproducible per generator
    r1 = get_method("resta").call([aligned, ft], base, per_model={}, params={"density": 0.5},
                                  generator=torch.Generator().manual_seed(1))
    r2 = get_method("resta").call([aligned, ft], base, per_model={}, params={"density": 0.5},
                                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2) and not torch.equal(r1, ft + 0.5 * (aligned - base))


def test_registered_param_validation():
    from safemerge.errors import ConfigError
    from safemerge.methods.catalog import get_method

    with pytest.raises(ConfigError):
        get_method("safemerge").param("tau").check(1.5, "safemerge")
    with pytest.raises(ConfigError):
        get_method("safemerge").param("alpha").check(-0.1, "safemerge")
    with pytest.raises(ConfigError):
        get_method("resta").param("density").check(0.0, "resta")


def test_qwen2_with_biases(qwen, tmp_path):
    """Qwen2 has q/k/v biases: they are never targets, and SafeMERGE/SafeLoRA/RESTA work on it."""
    scores = api.scan(qwen.base, qwen.aligned, qwen.ft)
    assert {s.module.rsplit(".", 1)[1] for s in scores} == {"q_proj", "v_proj", "up_proj", "down_proj"}
    base, al = Checkpoint(qwen.base), Checkpoint(qwen.aligned)
    assert "model.layers.0.self_attn.q_proj.bias" in al.names()
    ft = peft_deltas(qwen.aligned, qwen.ft)
    for s in scores:
        V = al.get(f"{s.module}.weight") - base.get(f"{s.module}.weight")
        assert s.rho == pytest.approx(rho_materialized(V, ft[s.module]), abs=1e-5)
    out = tmp_path / "q"
    res = api.safemerge_adapters(SafeMergeModels(qwen.base, qwen.aligned, qwen.ft, qwen.safety), out,
                                 settings=SafeMergeSettings(tau=0.5), merge_into=qwen.aligned)
    got = Checkpoint(out)
    sd = peft_deltas(qwen.aligned, qwen.safety)
    for n in al.names():
        m = n[: -len(".weight")] if n.endswith(".weight") else None
        if m in ft:
            d = 0.8 * ft[m] + 0.2 * sd[m] if m in res.merged else ft[m]
            torch.testing.assert_close(got.get(n), al.get(n) + d, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got.get(n), al.get(n)), n  # biases untouched
    api.safelora(base=qwen.base, aligned=qwen.aligned, finetuned=qwen.ft, out=tmp_path / "sl", mode="number",
                 num_layers=2)
    api.resta(unaligned=qwen.base, aligned=qwen.aligned, finetuned=qwen.ft, out=tmp_path / "r")


def test_yaml_merge_methods_through_the_engine(world, tmp_path):
    """The registered methods run through ``safemerge merge`` and equal the API outputs."""
    import yaml

    from safemerge.cli import main

    def merge(name, cfg):
        p = tmp_path / f"{name}.yml"
        p.write_text(yaml.safe_dump(cfg))
        try:
            main(["merge", str(p), str(tmp_path / name), "--no-progress"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        return Checkpoint(tmp_path / name)

    al, ft, sf = str(world.aligned), f"{world.aligned}+{world.ft}", f"{world.aligned}+{world.safety}"
    got = merge("sm", {"merge_method": "safemerge", "base_model": str(world.base), "dtype": "float32",
                       "models": [{"model": al}, {"model": ft}, {"model": sf}], "parameters": {"tau": 0.35,
                                                                                               "alpha": 0.8}})
    ref_dir = api.safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety),
                                     tmp_path / "sm_api", merge_into=world.aligned).out
    ref = Checkpoint(ref_dir)
    for n in ref.names():
        torch.testing.assert_close(got.get(n), ref.get(n), rtol=1e-5, atol=1e-6)
    # the extensions (safety_gain, min_layer) mean the same through the YAML method and the API
    got = merge("sm_ext", {"merge_method": "safemerge", "base_model": str(world.base), "dtype": "float32",
                           "models": [{"model": al}, {"model": ft}, {"model": sf}],
                           "parameters": {"tau": 1.0, "alpha": 0.2, "safety_gain": 2.0, "min_layer": 1}})
    extended = SafeMergeSettings(tau=1.0, alpha=0.2, safety_gain=2.0, min_layer=1)
    ref = Checkpoint(api.safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety),
                                            tmp_path / "sm_ext_api", settings=extended, merge_into=world.aligned).out)
    for n in ref.names():
        torch.testing.assert_close(got.get(n), ref.get(n), rtol=1e-5, atol=1e-6)
    got = merge("resta", {"merge_method": "resta", "base_model": str(world.base), "dtype": "float32",
                          "models": [{"model": al}, {"model": ft}], "parameters": {"beta": 0.5}})
    ref = Checkpoint(api.resta(unaligned=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "r_api",
                               beta=0.5))
    for n in ref.names():
        torch.testing.assert_close(got.get(n), ref.get(n), rtol=1e-5, atol=1e-6)
    # one executor, one seed function: `safemerge resta` and `merge_method: resta` draw the same DARE masks
    got = merge("resta_dare", {"merge_method": "resta", "base_model": str(world.base), "dtype": "float32",
                               "models": [{"model": al}, {"model": ft}], "parameters": {"beta": 0.5, "density": 0.6}})
    ref = Checkpoint(api.resta(unaligned=world.base, aligned=world.aligned, finetuned=world.ft, out=tmp_path / "rd_api",
                               beta=0.5, dare_density=0.6, options=RunOptions(seed=0)))
    for n in ref.names():
        assert torch.equal(got.get(n), ref.get(n)), n


def test_full_model_outputs_read_adapted_weights_in_float32(tmp_path):
    """The engine plans of the safety commands read ``MODEL+ADAPTER`` through ``Float32Reads``: RESTA on a bfloat16
    model computes with the exact float32 ``W + s·B·A`` (as before the one-executor redesign), not with it rounded
    to bfloat16 first (what ``merge_method: resta`` does, like mergekit, which merges the LoRA into the model)."""
    from safemerge.io.adapter import save_adapter
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    model = make_tiny_model("llama", seed=0, hidden=32, layers=1).to(torch.bfloat16)
    base = save_model(model, tmp_path / "base")
    perturb_model(model, seed=1, scale=0.02)
    aligned = save_model(model, tmp_path / "aligned")
    g = torch.Generator().manual_seed(2)
    w = "model.layers.0.self_attn.q_proj"
    A, B = torch.randn(2, 32, generator=g) * 0.1, torch.randn(32, 2, generator=g) * 0.01
    save_adapter(tmp_path / "lora", {w: (A, B)})
    out = api.resta(unaligned=base, aligned=aligned, finetuned=tmp_path / "lora", out=tmp_path / "r", beta=0.5)
    al, un = Checkpoint(aligned).get(f"{w}.weight"), Checkpoint(base).get(f"{w}.weight")
    exact = ((al + B @ A) + 0.5 * (al - un)).to(torch.bfloat16)
    rounded_first = ((al + B @ A).to(torch.bfloat16).float() + 0.5 * (al - un)).to(torch.bfloat16)
    got = Checkpoint(out).get(f"{w}.weight", dtype=None)
    assert got.dtype == torch.bfloat16
    assert not torch.equal(exact, rounded_first)  # the two readings differ on this input
    torch.testing.assert_close(got.float(), exact.float(), rtol=0, atol=0)
