"""SafeMERGE: exact linear adapters (checked in PEFT), --compat reference, --merge-into, dense strategies."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from safety_world import build_world, peft_deltas

from safemerge.io.checkpoint import Checkpoint
from safemerge.options import RunOptions
from safemerge.safety.api import safemerge_adapters
from safemerge.safety.settings import SafeMergeModels, SafeMergeSettings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


@pytest.fixture(scope="module")
def peft_ft(world):
    return peft_deltas(world.aligned, world.ft)


@pytest.fixture(scope="module")
def peft_safety(world):
    return peft_deltas(world.aligned, world.safety)


def _rel(a, b) -> float:
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


@pytest.mark.parametrize("tau,alpha", [(0.35, 0.8), (0.8, 0.6), (1.0, 0.0)])
def test_linear_adapter_in_peft_is_exact(world, peft_ft, peft_safety, tmp_path, tau, alpha):
    """rsLoRA r=2 safety + plain r=4 task adapter: merged layers = α ΔW_f + (1−α) ΔW_s, others ΔW_f."""
    out = tmp_path / "merged"
    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), out,
                             settings=SafeMergeSettings(tau=tau, alpha=alpha))
    merged = set(res.merged)
    assert merged == {s.module for s in res.scores if s.rho < tau}
    assert 0 < len(merged) or tau < 0.2
    got = peft_deltas(world.aligned, out)
    assert set(got) == set(peft_ft)  # the safety-only o_proj modules are not added
    cfg = json.loads((out / "adapter_config.json").read_text())
    for m, d_f in peft_ft.items():
        want = alpha * d_f + (1 - alpha) * peft_safety[m] if m in merged else d_f
        torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-7)
        sd = load_file(out / "adapter_model.safetensors")
        rank = sd[f"base_model.model.{m}.lora_A.weight"].shape[0]
        assert rank == (4 + 2 if m in merged else 4)  # rank r_f + r_s on merged layers only
    assert sorted(res.ignored_safety_modules) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    card = (out / "README.md").read_text()
    assert f"tau: {tau}" in card and f"alpha: {alpha}" in card and "strategy: linear" in card
    for s in res.scores:
        assert f"{s.rho:.6f}" in card
    rec = json.loads((out / "safemerge.json").read_text())
    assert [(r["module"], r["merged"]) for r in rec["layers"]] == [(s.module, s.module in merged) for s in res.scores]
    assert cfg["peft_type"] == "LORA"


def _raw(adapter_dir, module):
    sd = load_file(adapter_dir / "adapter_model.safetensors")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, a = cfg["r"], cfg["lora_alpha"]
    s = a / math.sqrt(r) if cfg.get("use_rslora") else a / r
    p = f"base_model.model.{module}"
    return sd[f"{p}.lora_A.weight"].double(), sd[f"{p}.lora_B.weight"].double(), s


def test_compat_reference_equals_dense_rederivation(world, tmp_path):
    """PEFT-0.14 factor-wise mixing: (Σ√(w s) B)(Σ√(w s) A) with cross terms, re-derived densely in float64."""
    tau, alpha = 0.8, 0.8
    out = tmp_path / "compat"
    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety_r4), out,
                             settings=SafeMergeSettings(tau=tau, alpha=alpha, compat="reference"))
    merged = set(res.merged)
    assert 0 < len(merged) < len(res.scores)
    got = peft_deltas(world.aligned, out)
    for s in res.scores:
        A_f, B_f, s_f = _raw(world.ft, s.module)
        A_s, B_s, s_s = _raw(world.safety_r4, s.module)
        if s.module in merged:
            w_f, w_s = alpha, 1 - alpha
            want = (w_f * s_f * B_f @ A_f + w_s * s_s * B_s @ A_s
                    + math.sqrt(w_f * s_f * w_s * s_s) * (B_f @ A_s + B_s @ A_f))
        else:
            want = s_f * B_f @ A_f
        torch.testing.assert_close(got[s.module].double(), want, rtol=1e-5, atol=1e-7)
    # it is *not* the paper formula on merged layers (cross terms)
    m = next(iter(merged))
    A_f, B_f, s_f = _raw(world.ft, m)
    A_s, B_s, s_s = _raw(world.safety_r4, m)
    paper = alpha * s_f * B_f @ A_f + (1 - alpha) * s_s * B_s @ A_s
    assert _rel(got[m].double(), paper) > 1e-3


def test_compat_reference_matches_peft_add_weighted_adapter(world, tmp_path):
    """With every layer merged (τ = 1), the output equals PEFT's own ``add_weighted_adapter(linear)``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "compat_all"
    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety_r4), out,
                             settings=SafeMergeSettings(tau=1.0, alpha=0.7, compat="reference"))
    assert len(res.merged) == len(res.scores)
    model = AutoModelForCausalLM.from_pretrained(world.aligned, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, world.ft, adapter_name="ft")
    pm.load_adapter(world.safety_r4, adapter_name="safe")
    pm.add_weighted_adapter(["ft", "safe"], [0.7, 0.3], "m", combination_type="linear")
    got = peft_deltas(world.aligned, out)
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            key = name.split("base_model.model.", 1)[1]
            torch.testing.assert_close(got[key], mod.get_delta_weight("m"), rtol=1e-5, atol=1e-7)


def test_compat_reference_refuses_different_ranks(world, tmp_path):
    from safemerge.errors import SafemergeError

    with pytest.raises(SafemergeError, match="equal rank"):
        safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), tmp_path / "x",
                           settings=SafeMergeSettings(compat="reference"))
    assert not (tmp_path / "x").exists()


def test_merge_into_writes_full_model(world, peft_ft, peft_safety, tmp_path):
    out = tmp_path / "full"
    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), out,
                             settings=SafeMergeSettings(tau=0.35, alpha=0.8), merge_into=world.aligned)
    merged = set(res.merged)
    assert merged
    got, al = Checkpoint(out), Checkpoint(world.aligned)
    assert got.names() == al.names()
    for n in al.names():
        m = n[: -len(".weight")]
        if m in peft_ft:
            d = 0.8 * peft_ft[m] + 0.2 * peft_safety[m] if m in merged else peft_ft[m]
            torch.testing.assert_close(got.get(n), al.get(n) + d, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got.get(n), al.get(n)), n
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loadable
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists()


def test_full_finetuned_model_dense_path(world, peft_ft, peft_safety, tmp_path_factory, tmp_path):
    """A full fine-tuned model: merged layers become W_aligned + α ΔW_f + (1−α) ΔW_s, the rest stay W_ft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    full = tmp_path_factory.getbasetemp() / "safety_world" / "ft_full"
    if not full.exists():
        m = AutoModelForCausalLM.from_pretrained(world.aligned, dtype=torch.float32)
        PeftModel.from_pretrained(m, world.ft).merge_and_unload().save_pretrained(full)
    out = tmp_path / "dense"
    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, full, world.safety), out,
                             settings=SafeMergeSettings(tau=0.35))
    assert res.output == "model"
    scored = {s.module for s in res.scores}
    assert set(peft_ft) <= scored  # every block weight is scored, untouched ones too
    merged = set(res.merged)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"} <= merged
    got, ft, al = Checkpoint(out), Checkpoint(full), Checkpoint(world.aligned)
    for m in merged & set(peft_ft):
        w = f"{m}.weight"
        want = al.get(w) + 0.8 * (ft.get(w) - al.get(w)) + 0.2 * peft_safety[m]
        torch.testing.assert_close(got.get(w), want, rtol=1e-5, atol=1e-6)
    for n in ft.names():
        if n[: -len(".weight")] not in merged:
            assert torch.equal(got.get(n), ft.get(n)), n


def test_outputs_are_deterministic(world, tmp_path):
    for name in ("a", "b"):
        safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), tmp_path / name,
                           settings=SafeMergeSettings(tau=0.5))
    for f in ("adapter_model.safetensors", "adapter_config.json", "README.md", "safemerge.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_existing_output_refused_unless_force(world, tmp_path):
    from safemerge.errors import SafemergeError

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SafemergeError, match="already exists"):
        safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), out)
    assert (out / "keep.txt").exists()
    safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), out,
                       options=RunOptions(force=True))
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()


def _has_method(name: str) -> bool:
    from safemerge.methods.catalog import all_methods

    return name in all_methods()


@pytest.mark.parametrize("strategy", ["dare_linear", "ties", "dare_ties"])
def test_dense_strategies(world, peft_ft, tmp_path, strategy):
    if not _has_method(strategy):
        pytest.skip(f"merge method {strategy!r} is not registered yet")
    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), tmp_path / "ad",
                             settings=SafeMergeSettings(strategy=strategy, density=0.7, tau=0.8),
                             options=RunOptions(seed=3))
    merged = set(res.merged)
    assert merged and set(res.reconstruction_error) == merged
    assert all(0.0 <= e < 1.0 for e in res.reconstruction_error.values())
    got = peft_deltas(world.aligned, tmp_path / "ad")
    for m in set(peft_ft) - merged:
        torch.testing.assert_close(got[m], peft_ft[m], rtol=1e-5, atol=1e-7)
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "reconstruction" in card.lower() and f"strategy: {strategy}" in card
    # full-model output with the same seed: merged layers equal the registered method on the dense deltas
    safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), tmp_path / "full",
                       settings=SafeMergeSettings(strategy=strategy, density=0.7, tau=0.8), options=RunOptions(seed=3),
                       merge_into=world.aligned)
    from safemerge.methods.update_merge import merge_dense

    got_full, al = Checkpoint(tmp_path / "full"), Checkpoint(world.aligned)
    peft_s = peft_deltas(world.aligned, world.safety)
    for m in merged:
        want = merge_dense(peft_ft[m], peft_s[m], weights=(0.8, 0.2), strategy=strategy, density=0.7, module=m, seed=3)
        w = f"{m}.weight"
        torch.testing.assert_close(got_full.get(w) - al.get(w), want, rtol=1e-4, atol=1e-6)
    # the SVD adapter's error is what it says
    for m in merged:
        w = f"{m}.weight"
        d = got_full.get(w) - al.get(w)
        assert _rel(got[m], d) == pytest.approx(res.reconstruction_error[m], abs=1e-4)
    # reproducible per seed
    safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), tmp_path / "ad2",
                       settings=SafeMergeSettings(strategy=strategy, density=0.7, tau=0.8), options=RunOptions(seed=3))
    weights = "adapter_model.safetensors"
    assert (tmp_path / "ad" / weights).read_bytes() == (tmp_path / "ad2" / weights).read_bytes()


def test_truncate_svd_exact_for_low_rank():
    from safemerge.methods.update_merge import truncate_svd

    g = torch.Generator().manual_seed(0)
    D = torch.randn(20, 3, generator=g) @ torch.randn(3, 12, generator=g)
    A, B, err = truncate_svd(D, 3)
    assert A.shape == (3, 12) and B.shape == (20, 3) and err < 1e-6
    torch.testing.assert_close(B @ A, D, rtol=1e-5, atol=1e-5)
    _, _, err1 = truncate_svd(D, 1)
    assert 0 < err1 < 1


def test_evaluate_hook_goes_into_model_card(world, tmp_path):
    seen = []

    def fake_eval(tmp):
        seen.append(sorted(p.name for p in tmp.iterdir()))
        card = "## Safety evaluation\n\n| Suite | Value |\n|---|---|\n| harmful | 25.0% |\n"
        return {"harmful": {"harmful_rate": 0.25}}, card

    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), tmp_path / "ev",
                             evaluate=fake_eval)
    assert "adapter_model.safetensors" in seen[0]  # evaluated after the weights were written
    card = (tmp_path / "ev" / "README.md").read_text()
    assert "## Safety evaluation" in card and "| harmful | 25.0% |" in card
    assert res.evaluation == {"harmful": {"harmful_rate": 0.25}}


def test_safety_gain_and_min_layer_are_exact(world, peft_ft, peft_safety, tmp_path):
    """The two extensions: only blocks ≥ min_layer merge, and they get α ΔW_f + g(1−α) ΔW_s (g = safety_gain)."""
    out = tmp_path / "ext"
    res = safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), out,
                             settings=SafeMergeSettings(tau=1.0, alpha=0.2, safety_gain=2.0, min_layer=1))
    merged = set(res.merged)
    assert merged == {s.module for s in res.scores if s.rho < 1.0 and s.layer is not None and s.layer >= 1}
    assert merged and merged != set(peft_ft)  # block 0 is left alone
    got = peft_deltas(world.aligned, out)
    for m, d_f in peft_ft.items():
        want = 0.2 * d_f + 2.0 * 0.8 * peft_safety[m] if m in merged else d_f
        torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-7)
    rec = json.loads((out / "safemerge.json").read_text())
    assert rec["safety_gain"] == 2.0 and rec["min_layer"] == 1
    card = (out / "README.md").read_text()
    assert "in blocks ≥ 1" in card and "α ΔW_f + 2·(1−α) ΔW_s" in card


def test_extensions_refused_out_of_range(world, tmp_path):
    from safemerge.errors import SafemergeError

    for kw in ({"safety_gain": -1.0}, {"min_layer": -2}):
        with pytest.raises(SafemergeError):  # refused when the settings are built, before anything is read
            safemerge_adapters(SafeMergeModels(world.base, world.aligned, world.ft, world.safety), tmp_path / "bad",
                               settings=SafeMergeSettings(**kw))
        assert not (tmp_path / "bad").exists()
