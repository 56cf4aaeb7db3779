"""End-to-end ``safemerge optimize`` on tiny models: in-memory vs on-disk merge, resume, cocktail, grid, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from optimize_world import build_world, config

from safemerge.options import RunOptions

QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("optworld"))


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_in_memory_merge_of_genome_equals_on_disk_merge_of_best_yml(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from safemerge.optimize import optimize
    from safemerge.optimize.candidate import CandidateEvaluator
    from safemerge.optimize.config import load_optimize_config

    cfg = config(world, method="dare_ties", granularity=1, filters=["self_attn"], max_evals=8, popsize=4)
    out = tmp_path / "run"
    summary = optimize(cfg, out, options=QUIET)
    assert {p.name for p in out.iterdir()} >= {"best.yml", "trace.jsonl", "trace.png", "report.md", "summary.json",
                                               "model"}
    assert not (out / "cma_state.pkl").exists()
    rows = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert len(rows) == summary["evaluations"] == 8
    best_row = min(rows, key=lambda r: r["loss"])
    assert summary["best_loss"] == pytest.approx(best_row["loss"])

    best = yaml.safe_load((out / "best.yml").read_text())
    ev = CandidateEvaluator(load_optimize_config(cfg))
    assert ev.genome.to_config(best_row["x"]) == best
    in_mem = ev.merge(best)
    on_disk = _safetensors(out / "model")
    assert set(on_disk) <= set(in_mem)
    for name, t in on_disk.items():
        assert torch.equal(in_mem[name].to(t.dtype), t), name
    # per-layer values really differ (the filters reached the engine)
    per_layer = best["models"][1]["parameters"]["weight"]
    assert isinstance(per_layer, list) and len({e["value"] for e in per_layer}) > 1
    # the score recorded during the search is the objective of the saved model
    saved = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert ev.objective(saved).loss == pytest.approx(best_row["loss"], rel=1e-5)


def test_resume_after_interruption_continues_the_same_run(world, tmp_path):
    from safemerge.errors import SafemergeError
    from safemerge.optimize import optimize

    cfg = config(world, method="ties", granularity=0, max_evals=12, popsize=4)
    ref = optimize(cfg, tmp_path / "ref", options=QUIET, save_model=False)

    def stop(gen, evals):
        if gen == 1:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        optimize(cfg, out, options=QUIET, save_model=False, on_generation=stop)
    assert not out.exists()
    with pytest.raises(SafemergeError, match="interrupted run"):
        optimize(cfg, out, options=QUIET, save_model=False)
    changed = config(world, method="ties", granularity=0, max_evals=16, popsize=4)
    with pytest.raises(SafemergeError, match="different config"):
        optimize(changed, out, options=QUIET, save_model=False, resume=True)
    res = optimize(cfg, out, options=QUIET, save_model=False, resume=True)
    assert res["resumed"] and res["evaluations"] == ref["evaluations"] == 12
    a = [json.loads(x) for x in (tmp_path / "ref" / "trace.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    assert [r["x"] for r in a] == [r["x"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert (tmp_path / "ref" / "best.yml").read_text() == (out / "best.yml").read_text()


def test_lm_cocktail_weights_equal_the_formula(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.optimize import optimize
    from safemerge.optimize.candidate import load_objective_data
    from safemerge.optimize.config import load_optimize_config
    from safemerge.optimize.objective import AnswerCEObjective

    cfg = config(world, cocktail={"temperature": 0.5})
    s = optimize(cfg, tmp_path / "ck", strategy="cocktail", options=QUIET)
    pool = [world["aligned"], world["expert"], world["bad"]]
    oc = load_optimize_config(cfg)
    safety, expert = load_objective_data(oc.data)
    obj = AnswerCEObjective(AutoTokenizer.from_pretrained(world["aligned"]), safety, expert, alpha=0.3, batch_size=5,
                            max_length=64)
    losses = [obj(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)).loss for p in pool]
    # the run's losses are the objective's (up to float32 kernel rounding: the run and this test load and batch
    # the models their own ways, and the CPU's GEMM kernels round accordingly) ...
    assert [s["model_losses"][p] for p in pool] == pytest.approx(losses, rel=1e-4)
    # ... and its weights are exactly softmax(−L/T) of those losses
    z = [math.exp(-s["model_losses"][p] / 0.5) for p in pool]
    expected = [v / sum(z) for v in z]
    best = yaml.safe_load((tmp_path / "ck" / "best.yml").read_text())
    assert best["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in best["models"]] == pytest.approx(expected, rel=1e-6)
    assert len(set(round(w, 6) for w in expected)) == 3  # the losses really differ
    merged = _safetensors(tmp_path / "ck" / "model")
    name = "model.layers.0.mlp.down_proj.weight"
    srcs = [_safetensors(__import__("pathlib").Path(p))[name] for p in pool]
    assert torch.allclose(merged[name], sum(w * t for w, t in zip(expected, srcs)), atol=1e-6)


def test_grid_search_scores_every_point_and_keeps_the_best(world, tmp_path):
    from safemerge.optimize import optimize

    cfg = config(world, method="ties", granularity=0)
    s = optimize(cfg, tmp_path / "grid", strategy="grid", options=QUIET, save_model=False)
    rows = [json.loads(x) for x in (tmp_path / "grid" / "trace.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {tuple(sorted(r["point"].items())) for r in rows} == {
        (("density", d), ("weight", w)) for d in (0.25, 0.5, 1.0) for w in (0.25, 0.5, 1.0)}
    best = min(rows, key=lambda r: r["loss"])
    assert s["grid_point"] == best["point"]
    cfg_best = yaml.safe_load((tmp_path / "grid" / "best.yml").read_text())
    assert all(m["parameters"] == {"weight": best["point"]["weight"],
                                   "density": best["point"]["density"]} for m in cfg_best["models"])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "slerp"])
def test_other_methods_run(world, tmp_path, method):
    from safemerge.optimize import optimize

    cfg = config(world, method=method, granularity=1, max_evals=4, popsize=4)
    s = optimize(cfg, tmp_path / method, options=QUIET, save_model=False)
    assert s["evaluations"] == 4 and math.isfinite(s["best_loss"])


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    from safemerge.cli import main

    p = tmp_path / "cfg.yml"
    cfg = config(world)
    cfg["genome"]["layer_granulrity"] = 2
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(p), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "layer_granulrity" in err and "did you mean 'layer_granularity'" in err
    cfg = config(world)
    cfg["genome"].pop("base_model")
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(p), "-o", str(tmp_path / "o")])
    assert e.value.code == 2 and "needs a base_model" in capsys.readouterr().err
    p.write_text(yaml.safe_dump(config(world)))
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(p), "-o", str(tmp_path / "o"), "--resume"])
    assert e.value.code == 2 and "no interrupted run" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(p), "-o", str(tmp_path / "exists")])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_cli_runs_and_writes_outputs(world, tmp_path, capsys):
    from safemerge.cli import main

    p = tmp_path / "cfg.yml"
    p.write_text(yaml.safe_dump(config(world, max_evals=4, popsize=4)))
    main(["optimize", str(p), "-o", str(tmp_path / "o"), "--no-save-model", "--no-progress"])
    out = capsys.readouterr().out
    assert '"evaluations": 4' in out
    assert (tmp_path / "o" / "best.yml").is_file() and not (tmp_path / "o" / "model").exists()


def test_a_pool_model_with_nan_is_refused_once_with_a_clear_error(world, tmp_path, capsys):
    """The pool is checked for NaN/Inf once per search (not per candidate); the error names the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    from safemerge.cli import main

    bad = tmp_path / "nan_expert"
    shutil.copytree(world["expert"], bad)
    sd = load_file(str(bad / "model.safetensors"))
    name = sorted(n for n in sd if "mlp" in n)[0]
    sd[name][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = config(world, max_evals=4, popsize=4)
    cfg["genome"]["models"][1] = str(bad)
    p = tmp_path / "cfg.yml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(p), "-o", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and name in err and "NaN" in err and "--allow-nonfinite" in err
    assert not (tmp_path / "o").exists()
    main(["optimize", str(p), "-o", str(tmp_path / "o"), "--no-progress", "--allow-nonfinite", "--no-save-model"])
    assert (tmp_path / "o" / "best.yml").is_file()


def test_objective_dtype_is_resolved_once_and_recorded(world, tmp_path):
    """objective.dtype: "auto" becomes this machine's dtype in the run key and the summary; bfloat16 scores
    candidates close to float32 (a search objective, not an exact number)."""
    from safemerge.evaluate.generate import resolve_dtype
    from safemerge.optimize import optimize

    runs = {}
    for dtype in ("auto", "float32", "bfloat16"):
        cfg = config(world, max_evals=4, popsize=4)
        cfg["objective"]["dtype"] = dtype
        runs[dtype] = optimize(cfg, tmp_path / dtype, options=QUIET, save_model=False)
        key = json.loads((tmp_path / dtype / "run.json").read_text())
        assert key["config"]["objective"]["dtype"] == runs[dtype]["objective_dtype"]
    assert runs["auto"]["objective_dtype"] == resolve_dtype("auto", "cpu")
    assert runs["bfloat16"]["objective_dtype"] == "bfloat16"
    trace = {d: [json.loads(x) for x in (tmp_path / d / "trace.jsonl").read_text().splitlines()] for d in runs}
    first32, first16 = trace["float32"][0]["loss"], trace["bfloat16"][0]["loss"]
    assert first16 == pytest.approx(first32, rel=0.03)


def test_unknown_objective_dtype_is_a_config_error(world):
    from safemerge.errors import ConfigError
    from safemerge.optimize.config import load_optimize_config

    cfg = config(world)
    cfg["objective"]["dtype"] = "int8"
    with pytest.raises(ConfigError, match="objective.dtype"):
        load_optimize_config(cfg)
