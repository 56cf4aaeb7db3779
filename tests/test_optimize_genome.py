"""Genome layout/decoding, and CMA-ES on a known objective (improvement, determinism, resume)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from safemerge.errors import ConfigError
from safemerge.optimize.config import CMASection, GenomeSection
from safemerge.optimize.evomm import STATE_FILE, run_evomm
from safemerge.optimize.genome import METHOD_PARAMS, Gene, Genome, decode_density, decode_t, decode_weight
from safemerge.optimize.trace import Trace


def _genome(**kw) -> Genome:
    args = dict(merge_method=kw.pop("method", "ties"), models=["A", "E"], base_model="B", layer_granularity=2,
                filters=["self_attn"])
    args.update(kw)
    num_layers = args.pop("num_layers", 4)
    return Genome(GenomeSection(**args), num_layers=num_layers)


def test_layout_counts_and_start_point():
    g = _genome()
    # 2 layer groups × 2 models × 2 sets × 2 params + outside group 2 models × 2 params
    assert len(g) == 2 * 2 * 2 * 2 + 2 * 2
    x0 = g.x0()
    for gene, v in zip(g.genes, x0):
        assert v == (0.5 if gene.param == "weight" else 1.0)
    assert len(_genome(layer_granularity=0, filters=[])) == 2 * 2
    s = _genome(method="slerp", models=["B", "E"], filters=[])
    assert {gn.param for gn in s.genes} == {"t"} and all(gn.model == -1 for gn in s.genes)
    assert len(s) == 2 + 1


def test_decode_transforms():
    assert decode_weight(-0.4, False) == 0.4
    assert decode_weight(-0.4, True) == -0.4
    assert decode_density(1.0, False) == 1.0 and decode_density(0.0, False) == 0.01
    assert decode_density(1.7, False) == pytest.approx(0.3)  # reflected at 1, no plateau
    assert decode_t(-0.2, False) == pytest.approx(0.2) and decode_t(0.3, False) == 0.3
    assert decode_t(2.25, False) == pytest.approx(0.25)


@pytest.mark.parametrize("method, models, negative", [
    ("linear", ["A", "E"], False), ("task_arithmetic", ["A", "E"], True), ("ties", ["A", "E"], False),
    ("dare_ties", ["A", "E", "F"], True), ("slerp", ["B", "E"], False), ("slerp", ["B", "E", "F"], False)])
def test_decode_follows_the_declared_parameters(method, models, negative):
    """Every gene decodes by its parameter's declared rule (module docstring); SLERP over > 2 models keeps its
    raw ranking genes, whatever their sign (no special case in decode: ``SLERP_TOP2_PARAMS``)."""
    g = _genome(method=method, models=models, allow_negative_weights=negative,
                filters=[] if method == "slerp" else ["self_attn"])
    x = np.linspace(-2.7, 3.1, len(g))
    top2 = method == "slerp" and len(models) > 2

    def expected(param: str, v: float) -> float:
        r = 1.0 - abs(abs(v) % 2.0 - 1.0)
        if top2:
            return v
        return {"weight": v if negative else abs(v), "density": max(0.01, r), "t": r}[param]

    decoded = g.decode(x)
    assert set(g.params) == ({"weight"} if top2 else set(METHOD_PARAMS[method]))
    for gene, v in zip(g.genes, x):
        assert decoded[gene] == pytest.approx(expected(gene.param, float(v)), abs=1e-9), gene


def test_to_config_is_a_valid_mergekit_config_with_per_layer_filters():
    from safemerge.config import load_config

    g = _genome(models=["A", "E"], parameters={"int8_mask": True})
    x = np.arange(len(g), dtype=float) / 100 + 0.05
    cfg = g.to_config(x)
    mc = load_config(cfg)  # validates against the merge config schema
    assert mc.merge_method == "ties"
    w = cfg["models"][1]["parameters"]["weight"]
    # layers 0-1 → group 0, 2-3 → group 1; the trailing dot keeps layer 1 from matching 10
    assert [e.get("filter") for e in w] == ["model.layers.0.self_attn", "model.layers.0.", "model.layers.1.self_attn",
                                            "model.layers.1.", "model.layers.2.self_attn", "model.layers.2.",
                                            "model.layers.3.self_attn", "model.layers.3.", None]
    vals = g.decode(x)
    assert w[0]["value"] == vals[Gene(0, 1, "self_attn", "weight")]
    assert w[4]["value"] == vals[Gene(1, 1, "self_attn", "weight")]
    assert w[-1]["value"] == vals[Gene(-1, 1, None, "weight")]
    assert cfg["parameters"] == {"normalize": False, "int8_mask": True}
    flat = _genome(layer_granularity=0, filters=[]).to_config([0.3, 0.9, -0.2, 0.5])
    assert flat["models"][0]["parameters"] == {"weight": 0.3, "density": 0.9}
    assert flat["models"][1]["parameters"] == {"weight": 0.2, "density": 0.5}


class QuadraticBackend:
    """A known objective on decoded parameters: Σ (value − target)², minimum 0."""

    def __init__(self, genome: Genome, target: dict[str, float]) -> None:
        self.g, self.target, self.calls = genome, target, 0

    def score_vectors(self, xs):
        out = []
        for x in xs:
            self.calls += 1
            vals = self.g.decode(x)
            loss = sum((v - self.target[k.param]) ** 2 for k, v in vals.items())
            out.append({"loss": loss, "safety_loss": loss, "expert_loss": 0.0, "merge_s": 0.0, "score_s": 0.0})
        return out


def test_cma_improves_a_known_objective(tmp_path):
    g = _genome()
    be = QuadraticBackend(g, {"weight": 0.8, "density": 0.6})
    start = be.score_vectors([g.x0()])[0]["loss"]
    res = run_evomm(g, be, CMASection(max_evals=1500, seed=1, sigma0=0.2), tmp_path, Trace(tmp_path / "trace.jsonl"))
    assert res["evals"] >= 1500 and res["evals"] % res["popsize"] == 0
    assert res["loss"] < 0.01 * start
    rows = Trace(tmp_path / "trace.jsonl").read()
    assert len(rows) == res["evals"] and min(r["loss"] for r in rows) == pytest.approx(res["loss"])
    first_gen = min(r["loss"] for r in rows if r["generation"] == 0)
    assert res["loss"] < first_gen


def _run(tmp, seed=1, max_evals=40, interrupt_at=None, resume=False):
    g = _genome()
    be = QuadraticBackend(g, {"weight": 0.8, "density": 0.6})

    def hook(gen, evals):
        if interrupt_at is not None and gen == interrupt_at:
            raise KeyboardInterrupt

    return run_evomm(g, be, CMASection(max_evals=max_evals, seed=seed, popsize=6), tmp, Trace(tmp / "trace.jsonl"),
                     resume=resume, on_generation=hook), be


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    a, _ = _run(tmp_path / "a")
    b, _ = _run(tmp_path / "b")
    c, _ = _run(tmp_path / "c", seed=2)
    assert a == b
    assert a["x"] != c["x"]


def test_resume_after_interruption_continues_the_same_run(tmp_path):
    full, uninterrupted = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), uninterrupted.mkdir()
    ref, _ = _run(full)
    with pytest.raises(KeyboardInterrupt):
        _run(uninterrupted, interrupt_at=3)
    assert (uninterrupted / STATE_FILE).is_file()
    # simulate a crash in the middle of generation 4: a partial trace line after the checkpoint
    with (uninterrupted / "trace.jsonl").open("a") as fh:
        fh.write('{"eval": 18, "loss": 123.0}\n')
    res, be = _run(uninterrupted, resume=True)
    assert be.calls == ref["evals"] - 18  # only the remaining generations were evaluated
    assert res == ref
    a = Trace(full / "trace.jsonl").read()
    b = Trace(uninterrupted / "trace.jsonl").read()
    assert [r["x"] for r in a] == [r["x"] for r in b] and [r["loss"] for r in a] == [r["loss"] for r in b]


def test_one_gene_genome_runs(tmp_path):
    g = Genome(GenomeSection(merge_method="linear", models=["A"]), num_layers=2)
    be = QuadraticBackend(g, {"weight": 0.3})
    res = run_evomm(g, be, CMASection(max_evals=60, seed=1), tmp_path, Trace(tmp_path / "t.jsonl"))
    assert math.isclose(g.decode(res["x"])[g.genes[0]], 0.3, abs_tol=0.05)


@pytest.mark.parametrize("method, models, negative, filters", [
    ("ties", ["A", "E"], False, ["self_attn"]), ("dare_ties", ["B", "E", "F"], True, []),
    ("slerp", ["B", "E"], False, []), ("slerp", ["B", "E", "F"], False, []), ("linear", ["A", "E"], False, [])])
def test_a_recorded_candidate_merges_again_to_the_same_config(method, models, negative, filters):
    """A trace row's decoded ``params`` give back the candidate's merge config (the decoders are idempotent)."""
    g = _genome(method=method, models=models, allow_negative_weights=negative, filters=filters)
    x = np.random.default_rng(1).normal(0.2, 1.3, len(g))  # out of every decoder's range: reflections, signs
    recorded = g.summary(x)
    again = g.vector_from_summary(recorded)
    assert g.to_config(again) == g.to_config(x)
    assert g.summary(again) == recorded
    with pytest.raises(ConfigError, match="lacks 1 gene"):
        g.vector_from_summary({k: v for k, v in list(recorded.items())[1:]})


def test_a_recorded_candidate_of_same_named_models_is_refused():
    g = _genome(models=["x/model", "y/model"], filters=[])
    with pytest.raises(ConfigError, match="share a directory name"):
        g.vector_from_summary(g.summary(g.x0()))
