"""SLERP over a pool of three: mergekit-evolve's top-2 rule per layer group, its grid, and the engine's merge.

Oracles: mergekit 0.1.5's own ``ModelGenome._slerp_slices`` for the decoding, and the registered
two-model ``slerp`` kernel applied to the chosen pair for the merged tensors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from optimize_world import build_world, config

from safemerge.options import RunOptions

QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("slerpworld"))


def _pool_config(world, **kw):
    cfg = config(world, method="slerp", **kw)
    cfg["genome"]["models"] = [world["aligned"], world["expert"], world["bad"]]
    return cfg


def _genome(models=("A", "E", "B"), granularity=2, num_layers=4):
    from safemerge.optimize.config import GenomeSection
    from safemerge.optimize.genome import Genome

    spec = GenomeSection(merge_method="slerp", models=list(models), base_model=models[0], layer_granularity=granularity)
    return Genome(spec, num_layers=num_layers)


def test_layout_has_one_raw_weight_per_group_and_model():
    g = _genome()
    assert g.slerp_top2 and len(g) == 2 * 3  # 2 groups × 3 models, no outside group (mergekit-evolve)
    assert {gene.param for gene in g.genes} == {"weight"}
    flat = _genome(granularity=0)
    assert len(flat) == 3
    from safemerge.errors import ConfigError
    from safemerge.optimize.config import GenomeSection
    from safemerge.optimize.genome import Genome

    with pytest.raises(ConfigError, match="no genome filters"):
        Genome(GenomeSection(merge_method="slerp", models=["A", "E", "B"], base_model="A", filters=["mlp"]),
               num_layers=4)


def test_decoding_matches_mergekit_evolve(world):
    """Our slices = mergekit's ``_slerp_slices`` on the same genotype (pair, base and t per group)."""
    from mergekit.evo.genome import ModelGenome, ModelGenomeDefinition

    models = [world["aligned"], world["expert"], world["bad"]]
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(world["aligned"]).num_hidden_layers
    ours = _genome(models=models, granularity=1, num_layers=n_layers)
    theirs = ModelGenome(ModelGenomeDefinition(models=models, merge_method="slerp", base_model=models[0],
                                               layer_granularity=1))
    rng = np.random.default_rng(5)
    for _ in range(5):
        x = rng.normal(size=len(ours))
        cfg = ours.to_config(x)
        genotype = torch.tensor(x, dtype=torch.float32).reshape(n_layers, len(models), 1, 1)
        ref = theirs.genotype_merge_config(genotype)
        assert len(cfg["slices"]) == len(ref.slices) == n_layers
        for mine, other in zip(cfg["slices"], ref.slices):
            assert mine["base_model"] == str(other.base_model)
            assert [s["model"] for s in mine["sources"]] == [str(s.model) for s in other.sources]
            assert [s["layer_range"] for s in mine["sources"]] == [list(s.layer_range) for s in other.sources]
            assert mine["parameters"]["t"] == pytest.approx(other.parameters["t"], abs=1e-6)


def test_grid_is_every_partner_times_every_t():
    from safemerge.optimize.config import GridSection
    from safemerge.optimize.grid import grid_points

    g = _genome()
    pts = grid_points(g, GridSection())
    assert len(pts) == 2 * 10 and {p["partner"] for p in pts} == {1, 2}
    for pt in pts:
        vals = g.decode(g.grid_vector(pt))
        for group in range(g.n_layer_groups):
            first, second, t = g.slerp_pair(vals, group)
            if pt["t"] <= 0.5:
                assert (first, second) in ((0, pt["partner"]), (pt["partner"], 0))
                assert t == pytest.approx(pt["t"], abs=1e-9)
            else:  # slerp(base, m, t) written as slerp(m, base, 1 − t)
                assert (first, second) == (pt["partner"], 0)
                assert t == pytest.approx(1.0 - pt["t"], abs=1e-12)


def test_merged_tensors_are_the_pair_slerp_and_best_yml_merges_the_same(world, tmp_path):
    from safetensors.torch import load_file

    from safemerge.api import merge
    from safemerge.methods.catalog import get_method
    from safemerge.optimize import optimize
    from safemerge.optimize.candidate import CandidateEvaluator
    from safemerge.optimize.config import load_optimize_config
    from safemerge.options import RunOptions

    cfg = _pool_config(world, granularity=1, max_evals=4, popsize=4)
    summary = optimize(cfg, tmp_path / "run", options=QUIET)
    assert summary["evaluations"] == 4 and math.isfinite(summary["best_loss"])
    best = yaml.safe_load((tmp_path / "run" / "best.yml").read_text())
    assert best["merge_method"] == "slerp" and len(best["slices"]) >= 2
    merge(str(tmp_path / "run" / "best.yml"), str(tmp_path / "again"), options=RunOptions(seed=7))
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(saved) == set(again) and all(torch.equal(saved[k], again[k]) for k in saved)

    ev = CandidateEvaluator(load_optimize_config(cfg))
    x = np.array([0.3, -0.2, 0.9, 0.1, 0.5, -1.0])[: len(ev.genome)]
    state = ev.merge(ev.genome.to_config(x))
    vals = ev.genome.decode(x)
    slerp = get_method("slerp")
    pool = {m: load_file(f"{m}/model.safetensors") for m in ev.genome.models}
    for layer in range(ev.genome.num_layers):
        first, second, t = ev.genome.slerp_pair(vals, ev.genome.group_of_layer(layer))
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        a, b = pool[ev.genome.models[first]][name].float(), pool[ev.genome.models[second]][name].float()
        expected = slerp.call([b], a, params={"t": t})
        assert torch.allclose(state[name], expected, atol=1e-6)


def test_config_rules(world):
    from safemerge.errors import ConfigError
    from safemerge.optimize.config import load_optimize_config

    cfg = _pool_config(world)
    load_optimize_config(cfg)  # three models: accepted
    cfg["genome"]["models"] = [world["expert"], world["bad"], world["data"]]
    with pytest.raises(ConfigError, match="base_model among genome.models"):
        load_optimize_config(cfg)
