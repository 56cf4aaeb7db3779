"""``MODEL+ADAPTER`` (mergekit's syntax) in every command that takes a model, as docs/adapters.md promises.

Oracles per command: the same command on the adapter given separately (``--adapter``, an adapter
directory on the aligned model) or on the adapted model materialised on disk first (PEFT's
``merge_and_unload`` / ``safemerge merge``) gives the same numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli  # noqa: E402
from safety_world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


@pytest.fixture(scope="module")
def materialised(world, tmp_path_factory) -> Path:
    """aligned + ft merged by PEFT and saved as a plain model directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("materialised") / "aligned_ft"
    lm = AutoModelForCausalLM.from_pretrained(world.aligned, dtype=torch.float32)
    PeftModel.from_pretrained(lm, world.ft).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(world.aligned).save_pretrained(out)
    return out


run = run_cli  # the shared in-process CLI runner (tests/conftest.py)


def _rho(path: Path) -> list[float]:
    return [r["rho"] for r in json.loads(path.read_text())]


def test_scan(world, materialised, tmp_path, capsys):
    """ALIGNED+ADAPTER is the adapter's exact low-rank update; OTHER+ADAPTER and the materialised model
    are dense deltas — all three give the same ρ."""
    outs = {}
    for name, ref in (("adapter", world.ft), ("plus", f"{world.aligned}+{world.ft}"), ("dense", materialised),
                      ("plus_dense", f"{materialised}+{world.safety}")):
        outs[name] = tmp_path / f"{name}.json"
        code, _, err = run(capsys, "scan", "--base", world.base, "--aligned", world.aligned, ref, "--json", outs[name],
                           "--targets", "q_proj,v_proj,up_proj,down_proj", "-q")
        assert code == 0, err
    assert _rho(outs["plus"]) == _rho(outs["adapter"])  # same code path: bit-identical
    assert _rho(outs["dense"]) == pytest.approx(_rho(outs["adapter"]), abs=1e-4)
    assert _rho(outs["plus_dense"]) != pytest.approx(_rho(outs["dense"]), abs=1e-4)  # the second adapter counts


def test_safemerge(world, tmp_path, capsys):
    for name, ft, sf in (("dirs", world.ft, world.safety),
                         ("refs", f"{world.aligned}+{world.ft}", f"{world.aligned}+{world.safety}")):
        code, _, err = run(capsys, "safemerge", "--base", world.base, "--aligned", world.aligned, "--finetuned", ft,
                           "--safety", sf, "-o", tmp_path / name, "-q")
        assert code == 0, err
    a, b = (tmp_path / n / "adapter_model.safetensors" for n in ("dirs", "refs"))
    assert a.read_bytes() == b.read_bytes()


def test_eval_model_plus_adapter_equals_adapter_option(world, tmp_path, capsys):
    common = ["--harmful", "builtin:harmful", "--limit", "3", "--max-new-tokens", "6", "--no-progress"]
    code, _, err = run(capsys, "eval", f"{world.aligned}+{world.ft}", "-o", tmp_path / "plus", *common)
    assert code == 0, err
    code, _, err = run(capsys, "eval", world.aligned, "--adapter", world.ft, "-o", tmp_path / "opt", *common)
    assert code == 0, err
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("plus", "opt"))
    assert a["model_identity"] == b["model_identity"] and a["adapter"] == b["adapter"] == str(world.ft)
    gens = [(tmp_path / n / "generations.jsonl").read_text() for n in ("plus", "opt")]
    assert gens[0] == gens[1]
    code, _, err = run(capsys, "eval", f"{world.aligned}+{world.ft}", "--adapter", world.safety, "-o", tmp_path / "two",
                       *common)
    assert code == 2 and "two adapters given" in err


def test_train_lora_on_model_plus_adapter(world, materialised, tmp_path, capsys):
    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"a b {c}", "response": f"{c} d"}) + "\n" for c in "efghij"))
    for name, model in (("plus", f"{world.aligned}+{world.ft}"), ("dir", materialised)):
        code, _, err = run(capsys, "train-lora", model, "--data", data, "-o", tmp_path / name, "--rank", "2",
                           "--steps", "2", "--batch-size", "3", "-q")
        assert code == 0, err
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("plus", "dir"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_synth_loads_model_plus_adapter(world, tmp_path, capsys):
    """synth's generator for MODEL+ADAPTER is the evaluation generator with the adapter applied."""
    from safemerge.evaluate.generate import load_generator
    from safemerge.synth.common import load_generator as synth_generator

    prompts = ["a b c", "d e f"]
    got = synth_generator(f"{world.aligned}+{world.ft}", backend="hf").generate(prompts, max_new_tokens=5,
                                                                                progress=False)
    want = load_generator(str(world.aligned), adapter=str(world.ft), backend="hf").generate(prompts, max_new_tokens=5,
                                                                                          progress=False)
    assert got == want
    # the CLI gets past loading and generating (a random tiny model never refuses, so nothing is kept)
    code, _, err = run(capsys, "synth", "safety", "--prompts", "builtin:harmful", "-n", "2", "-m",
                       f"{world.aligned}+{world.ft}",
                       "--max-new-tokens", "4", "-o", tmp_path / "s.jsonl", "-q")
    assert code == 2 and "no model of the pool refused" in err


def test_optimize_pool_with_model_plus_adapter(tmp_path_factory, tmp_path, capsys):
    """An optimize pool member ALIGNED+LORA scores exactly like the same model merged to disk first."""
    from optimize_world import build_world as build_pool

    from safemerge.io.adapter import save_adapter

    pool = build_pool(tmp_path_factory.getbasetemp() / "optimize_world_refs")
    g = torch.Generator().manual_seed(5)
    lora = tmp_path / "lora"
    factors = {}
    for i in range(2):
        out_dim, in_dim = _down_proj_shape(pool["aligned"], i)
        factors[f"model.layers.{i}.mlp.down_proj"] = (0.1 * torch.randn(2, in_dim, generator=g),
                                                     0.1 * torch.randn(out_dim, 2, generator=g))
    save_adapter(lora, factors)
    ref = f"{pool['aligned']}+{lora}"
    disk = tmp_path / "disk"
    (tmp_path / "m.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {ref}\n"
                                    "    parameters: {weight: 1.0}\ndtype: float32\n")
    code, _, err = run(capsys, "merge", tmp_path / "m.yml", disk, "-q")
    assert code == 0, err
    losses = {}
    for name, member in (("ref", ref), ("disk", str(disk))):
        cfg = {"genome": {"models": [pool["aligned"], member], "base_model": pool["aligned"],
                          "merge_method": "task_arithmetic",
                          "layer_granularity": 0},
               "data": {"safety": pool["data"], "expert": pool["data"]},
               "objective": {"alpha": 0.3, "batch_size": 3, "max_length": 64},
               "grid": {"weight": [0.5, 1.0]}, "strategy": "grid", "seed": 7}
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        code, _, err = run(capsys, "optimize", tmp_path / f"{name}.yml", "-o", tmp_path / f"o_{name}",
                           "--no-save-model", "-q")
        assert code == 0, err
        trace = (tmp_path / f"o_{name}" / "trace.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["loss"] for x in trace]
    assert len(losses["ref"]) == 2 and losses["ref"] == pytest.approx(losses["disk"], abs=1e-9)


def _down_proj_shape(model_dir: str, i: int) -> tuple[int, int]:
    from safemerge.io.checkpoint import Checkpoint

    out_dim, in_dim = Checkpoint(model_dir).shape(f"model.layers.{i}.mlp.down_proj.weight")
    return out_dim, in_dim
