"""ρ without C: low-rank and dense similarities equal the materialised-C reference; selection rules."""
from __future__ import annotations

import pytest
import torch
from safety_world import build_world

from safemerge.methods.similarity import project_dense, rho_dense, rho_lowrank, rho_materialized
from safemerge.safety.selection import LayerScore, select_below, select_lowest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


@pytest.mark.parametrize("out_dim,in_dim,r", [(48, 32, 4), (24, 40, 3), (64, 64, 8), (40, 16, 1)])
def test_lowrank_rho_matches_materialized_C(out_dim, in_dim, r):
    g = torch.Generator().manual_seed(out_dim * 7 + in_dim)
    V = torch.randn(out_dim, in_dim, generator=g)
    A = torch.randn(r, in_dim, generator=g)
    B = torch.randn(out_dim, r, generator=g)
    dense = rho_materialized(V, B @ A)
    assert rho_lowrank(V, A, B) == pytest.approx(dense, abs=1e-5)
    assert rho_lowrank(V, A, 3.7 * B) == pytest.approx(dense, abs=1e-5)  # the LoRA scale cancels
    assert rho_dense(V, B @ A) == pytest.approx(dense, abs=1e-5)


@pytest.mark.parametrize("out_dim,in_dim", [(48, 32), (24, 40)])
def test_dense_rho_and_projection_match_materialized_C(out_dim, in_dim):
    g = torch.Generator().manual_seed(11)
    V = torch.randn(out_dim, in_dim, generator=g)
    D = torch.randn(out_dim, in_dim, generator=g)
    C = V @ V.T / torch.linalg.vector_norm(V)
    assert rho_dense(V, D) == pytest.approx(rho_materialized(V, D), abs=1e-5)
    torch.testing.assert_close(project_dense(V, D), C @ D, rtol=1e-5, atol=1e-5)
    B = torch.randn(out_dim, 3, generator=g)
    torch.testing.assert_close(project_dense(V, B), C @ B, rtol=1e-5, atol=1e-5)


def test_rho_is_one_in_the_subspace_and_zero_outside():
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    V = U[:, :1] @ torch.randn(1, 20, generator=g)  # rank one: C projects on U[:, 0]
    A = torch.randn(2, 20, generator=g)
    assert rho_lowrank(V, A, U[:, :1].repeat(1, 2)) == pytest.approx(1.0, abs=1e-6)
    assert rho_lowrank(V, A, U[:, 5:7]) == pytest.approx(0.0, abs=1e-6)
    assert rho_lowrank(torch.zeros(30, 20), A, U[:, :2]) == 0.0  # ‖V‖ < 1e-9 → C = 0 → ρ = 0
    assert rho_dense(torch.zeros(30, 20), torch.ones(30, 20)) == 0.0


def test_scan_rho_equals_dense_C_on_real_peft_adapters(world):
    from safety_world import peft_deltas

    from safemerge.io.checkpoint import Checkpoint
    from safemerge.safety.api import scan

    scores = scan(world.base, world.aligned, [world.ft, world.safety])
    base, aligned = Checkpoint(world.base), Checkpoint(world.aligned)
    for src, path in (("ft", world.ft), ("safety", world.safety)):
        deltas = peft_deltas(world.aligned, path)
        mine = [s for s in scores if s.source == src]
        assert {s.module for s in mine} == set(deltas)
        for s in mine:
            w = f"{s.module}.weight"
            V = aligned.get(w) - base.get(w)
            assert s.rho == pytest.approx(rho_materialized(V, deltas[s.module]), abs=1e-5), s.module
            assert s.delta_norm == pytest.approx(float(torch.linalg.vector_norm(deltas[s.module])), rel=1e-5)
            assert s.merged == (s.rho < 0.35)
            assert s.layer == int(s.module.split(".")[2])
    # the world has both low- and high-similarity layers
    rhos = [s.rho for s in scores if s.source == "ft"]
    assert min(rhos) < 0.35 < max(rhos)


def test_full_model_input_scores_like_its_adapter(world, tmp_path_factory):
    """A full fine-tuned model (aligned + merged LoRA) gives the same ρ through the dense path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from safemerge.safety.api import scan

    full = tmp_path_factory.getbasetemp() / "safety_world" / "ft_full"
    if not full.exists():
        m = AutoModelForCausalLM.from_pretrained(world.aligned, dtype=torch.float32)
        PeftModel.from_pretrained(m, world.ft).merge_and_unload().save_pretrained(full)
    lr = {s.module: s.rho for s in scan(world.base, world.aligned, world.ft)}
    dense = {s.module: s.rho for s in scan(world.base, world.aligned, full, target_modules=["q_proj", "v_proj",
                                                                                            "up_proj", "down_proj"])}
    assert set(dense) == set(lr)
    for m in lr:
        assert dense[m] == pytest.approx(lr[m], abs=1e-4), m  # ΔW recovered by a float32 subtraction


def _scores(rhos):
    return [LayerScore(f"model.layers.{i}.q_proj", i, "q_proj", r, 1.0, 1.0) for i, r in enumerate(rhos)]


def test_selection_is_monotone_in_tau():
    g = torch.Generator().manual_seed(3)
    scores = _scores(torch.rand(40, generator=g).tolist())
    taus = [-1.0, -0.2, 0.0, 0.1, 0.25, 0.35, 0.5, 0.77, 0.9, 1.0]
    prev: set[str] = set()
    for t in taus:
        for strict in (True, False):
            sel = select_below(scores, t, strict=strict)
            assert sel == {s.module for s in scores if (s.rho < t if strict else s.rho <= t)}
        sel = select_below(scores, t)
        assert prev <= sel
        prev = sel
    assert select_below(scores, 1.0) == {s.module for s in scores}
    assert select_below(scores, -1.0) == set()


def test_strict_vs_nonstrict_at_the_threshold():
    scores = _scores([0.2, 0.35, 0.5])
    assert select_below(scores, 0.35, strict=True) == {"model.layers.0.q_proj"}
    assert select_below(scores, 0.35, strict=False) == {"model.layers.0.q_proj", "model.layers.1.q_proj"}


def test_select_lowest_number_mode():
    scores = _scores([0.9, 0.1, 0.5, 0.3, 0.3, 0.7])
    sel, tau_k = select_lowest(scores, 2)
    assert tau_k == 0.3 and sel == {"model.layers.1.q_proj", "model.layers.3.q_proj",
                                    "model.layers.4.q_proj"}  # tie included
    sel, _ = select_lowest(scores, 1)
    assert sel == {"model.layers.1.q_proj"}
    sel, _ = select_lowest(scores, 100)
    assert len(sel) == 6


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), "x"])
def test_tau_validation(bad):
    from safemerge.errors import SafemergeError

    with pytest.raises(SafemergeError):
        select_below(_scores([0.1]), bad)
