"""CLI: scan outputs (table, JSON, CSV, PNG), the write commands, and user errors → exit 2, no traceback."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from safety_world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "safety_world", "llama")


@pytest.fixture(scope="module")
def bad_adapters(world, tmp_path_factory):
    """Adapters that do not fit the model: a module the model lacks, and a wrong input dimension."""
    from safemerge.io.adapter import save_adapter

    root = tmp_path_factory.mktemp("bad_adapters")
    g = torch.Generator().manual_seed(0)
    save_adapter(root / "absent", {"model.layers.7.self_attn.q_proj": (torch.randn(2, 32, generator=g),
                                                                       torch.randn(32, 2, generator=g))})
    save_adapter(root / "shape", {"model.layers.0.self_attn.q_proj": (torch.randn(2, 48, generator=g),
                                                                      torch.randn(32, 2, generator=g))})
    return root


run = run_cli  # the shared in-process CLI runner (tests/conftest.py)


def test_scan_outputs(world, tmp_path, capsys):
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    code, out, err = run(capsys, "scan", "--base", world.base, "--aligned", world.aligned, world.ft, world.safety,
                         "--tau", "0.35", "--json", j, "--csv", c, "--plot", p, "--no-progress")
    assert code == 0, err
    recs = json.loads(j.read_text())
    assert len(recs) == 8 + 10
    for r in recs:
        assert {"module", "layer", "rho", "delta_norm", "merged", "source"} <= r.keys()
        assert r["module"].startswith("model.layers.") and r["merged"] == (r["rho"] < 0.35)
    rows = list(csv.DictReader(c.open()))
    assert [r["module"] for r in rows] == [r["module"] for r in recs]
    assert [float(r["rho"]) for r in rows] == [r["rho"] for r in recs]
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "q_proj" in out and "ρ" in out  # rich table on stdout


def test_safemerge_safelora_resta_mergealign_commands(world, tmp_path, capsys):
    code, _, err = run(capsys, "safemerge", "--base", world.base, "--aligned", world.aligned, "--finetuned", world.ft,
                       "--safety", world.safety, "-o", tmp_path / "sm", "--tau", "0.5", "--alpha", "0.7", "-q",
                       "--no-progress")
    assert code == 0, err
    assert (tmp_path / "sm" / "adapter_model.safetensors").exists()
    card = (tmp_path / "sm" / "README.md").read_text()
    assert "tau: 0.5" in card and "alpha: 0.7" in card
    code, _, err = run(capsys, "safelora", "--base", world.base, "--aligned", world.aligned, "--finetuned", world.ft,
                       "-o", tmp_path / "sl", "--mode", "number", "-k", "2", "-q", "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "sl" / "safemerge.json").read_text())["projected"] == 2
    code, _, err = run(capsys, "resta", "--unaligned", world.base, "--aligned", world.aligned, "--finetuned", world.ft,
                       "-o", tmp_path / "r", "--beta", "0.5", "--dare-density", "0.9", "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "mergealign", "--pretrained", world.base, "--domain", f"{world.base}+{world.ft}",
                       "--aligned", world.aligned, "-o", tmp_path / "ma", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "ma" / "model.safetensors").exists()


def _common(world):
    return ["--base", world.base, "--aligned", world.aligned, "--finetuned", world.ft, "--safety", world.safety,
            "--no-progress"]


@pytest.mark.parametrize("extra,needle", [
    (["--tau", "1.5"], "--tau"),
    (["--tau", "-2"], "--tau"),
    (["--alpha", "1.2"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"),
    (["--strategy", "magic"], "strategy"),
    (["--compat", "peft"], "--compat"),
    (["--compat", "reference"], "equal rank"),
    (["--strategy", "ties", "--density", "0"], "--density"),
    (["--dtype", "int8"], "--dtype"),
])
def test_safemerge_user_errors_exit_2(world, tmp_path, capsys, extra, needle):
    code, _, err = run(capsys, "safemerge", *_common(world), "-o", tmp_path / "o", *extra)
    assert code == 2
    assert err.startswith("error: ") and needle in err and "hint: " in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_adapter_errors_exit_2(world, bad_adapters, tmp_path, capsys):
    for name, needle in (("absent", "model.layers.7.self_attn.q_proj"), ("shape", "shape")):
        code, _, err = run(capsys, "scan", "--base", world.base, "--aligned", world.aligned, bad_adapters / name,
                           "--no-progress")
        assert code == 2 and needle in err and "hint:" in err and "Traceback" not in err, err
        code, _, err = run(capsys, "safemerge", "--base", world.base, "--aligned", world.aligned, "--finetuned",
                           world.ft,
                           "--safety", bad_adapters / name, "-o", tmp_path / "o", "--no-progress")
        assert code == 2 and needle in err, err


def test_other_errors_exit_2(world, tmp_path, capsys):
    # existing output without --force
    (tmp_path / "exists").mkdir()
    code, _, err = run(capsys, "safemerge", *_common(world), "-o", tmp_path / "exists")
    assert code == 2 and "already exists" in err and "--force" in err
    # a missing path
    code, _, err = run(capsys, "scan", "--base", world.base, "--aligned", world.aligned, tmp_path / "nope",
                       "--no-progress")
    assert code == 2 and "does not exist" in err
    # an adapter passed as --base
    code, _, err = run(capsys, "scan", "--base", world.ft, "--aligned", world.aligned, world.ft, "--no-progress")
    assert code == 2 and "adapter" in err
    # pickle checkpoints are refused without --allow-pickle
    pk = tmp_path / "pickled"
    pk.mkdir()
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, pk / "pytorch_model.bin")
    code, _, err = run(capsys, "scan", "--base", pk, "--aligned", world.aligned, world.ft, "--no-progress")
    assert code == 2 and "pickle" in err and "--allow-pickle" in err
    # SafeLoRA / RESTA validation
    code, _, err = run(capsys, "safelora", "--base", world.base, "--aligned", world.aligned, "--finetuned", world.ft,
                       "-o", tmp_path / "x", "--mode", "threshold", "--tau", "3", "--no-progress")
    assert code == 2 and "--tau" in err
    code, _, err = run(capsys, "resta", "--unaligned", world.base, "--aligned", world.aligned, "--finetuned", world.ft,
                       "-o", tmp_path / "x", "--dare-density", "1.5", "--no-progress")
    assert code == 2 and "--dare-density" in err
    assert not (tmp_path / "x").exists()


def test_console_script_exit_code_without_traceback(world, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "safemerge.cli", "safemerge", *map(str, _common(world)), "-o",
                        str(tmp_path / "o"),
                        "--tau", "7"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.startswith("error: --tau") and "Traceback" not in p.stderr
