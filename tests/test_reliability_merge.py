"""Reliability of ``safemerge merge``: crash safety under SIGKILL, determinism across runs and -j,
numerical safety (fp32 compute, NaN/Inf refusal), and clean errors for bad input."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safemerge.options import RunOptions  # noqa: E402
from safemerge.testing import make_tiny_model, perturb_model, save_model  # noqa: E402

SAFEMERGE = [sys.executable, "-m", "safemerge.cli"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*SAFEMERGE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel_models")
    out = {}
    base = make_tiny_model("llama", seed=0, hidden=64, layers=2)
    out["base"] = save_model(base, root / "base")
    for i in (1, 2, 3):
        m = make_tiny_model("llama", seed=0, hidden=64, layers=2)
        perturb_model(m, seed=i, scale=0.02)
        out[f"m{i}"] = save_model(m, root / f"m{i}")
    return out


def _cfg(tmp: Path, models: dict[str, Path], method: str, extra: str = "density: 0.5") -> Path:
    text = f"""merge_method: {method}
base_model: {models['base']}
models:
  - model: {models['m1']}
    parameters: {{weight: 0.5, {extra}}}
  - model: {models['m2']}
    parameters: {{weight: 0.3, {extra}}}
  - model: {models['m3']}
    parameters: {{weight: 0.2, {extra}}}
"""
    p = tmp / f"{method}.yml"
    p.write_text(text)
    return p


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}


@pytest.mark.parametrize("method,extra", [("dare_ties", "density: 0.5"), ("della", "density: 0.5, epsilon: 0.1"),
                                          ("dare_linear", "density: 0.3"), ("ties", "density: 0.5")])
def test_byte_identical_across_runs_and_jobs(models, tmp_path, method, extra) -> None:
    from safemerge.api import merge

    cfg = _cfg(tmp_path, models, method, extra)
    digests = []
    for run, jobs in enumerate((1, 2, 4, 2)):
        out = merge(cfg, tmp_path / f"out{run}", options=RunOptions(seed=7, threads=jobs, progress=False))
        digests.append(_digest(out))
    assert all(d == digests[0] for d in digests)
    other = merge(cfg, tmp_path / "other_seed", options=RunOptions(seed=8, threads=2, progress=False))
    if method != "ties":  # a different seed gives a different random mask
        assert _digest(other)["model.safetensors"] != digests[0]["model.safetensors"]


def test_bf16_inputs_computed_in_fp32_without_overflow(tmp_path) -> None:
    """Large-magnitude bf16/fp16 weights: the merge stays finite (fp32 arithmetic)."""
    from safetensors.torch import load_file

    from safemerge.api import merge

    paths = {}
    for i, dtype in enumerate(("float16", "float16", "float16")):
        m = make_tiny_model("llama", seed=0)
        perturb_model(m, seed=i + 1, scale=0.01)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(2.0e4 if p.ndim > 1 else 1.0)  # near fp16's max (65504): the sum of three overflows in fp16
        m = m.to(getattr(torch, dtype))
        paths[f"m{i}"] = save_model(m, tmp_path / f"m{i}")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {p}\n    parameters: {{weight: 1.0}}\n" for p in paths.values())
        + "parameters: {normalize: true}\nout_dtype: float16\n"
    )
    out = merge(cfg, tmp_path / "out", options=RunOptions(progress=False))
    tensors = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    # fp32 reference
    refs = [load_file(p / "model.safetensors") for p in paths.values()]
    name = "model.layers.0.mlp.up_proj.weight"
    expect = (sum(r[name].float() for r in refs) / 3).half()
    assert torch.equal(tensors[name], expect)


def test_nan_input_refused_unless_allowed(models, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in models["m1"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {bad}\n    parameters: {{weight: 0.5}}\n  - model: "
                   f"{models['m2']}\n    parameters: {{weight: 0.5}}\n")
    r = _cli("merge", str(cfg), str(tmp_path / "out"))
    assert r.returncode == 2
    assert "model.layers.1.mlp.down_proj.weight" in r.stderr and "NaN" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".safemerge-tmp-" in p.name]
    r = _cli("merge", str(cfg), str(tmp_path / "out"), "--allow-nonfinite")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> dict[str, Path]:
    """Models large enough (~40 MB each) that a merge takes a noticeable time."""
    root = tmp_path_factory.mktemp("crash_models")
    out = {}
    base = make_tiny_model("llama", seed=0, hidden=384, layers=4, vocab_size=8000)
    out["base"] = save_model(base, root / "base")
    for i in (1, 2, 3):
        perturb_model(base, seed=i, scale=0.01)
        out[f"m{i}"] = save_model(base, root / f"m{i}")
    return out


def _check_complete(out: Path, reference: dict[str, str]) -> None:
    assert _digest(out) == reference, "a visible output directory must be complete"


def test_sigkill_leaves_no_partial_output(big_models, tmp_path) -> None:
    """SIGKILL a running merge at random points (20 trials): OUT is absent or complete."""
    cfg = _cfg(tmp_path, big_models, "ties")
    ref_out = tmp_path / "reference"
    t0 = time.perf_counter()
    r = _cli("merge", str(cfg), str(ref_out), "-j", "2", "--no-progress")
    full = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    reference = _digest(ref_out)
    rng = random.Random(1234)
    out = tmp_path / "out"
    outcomes = {"absent": 0, "complete": 0}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for trial in range(20):
        proc = subprocess.Popen([*SAFEMERGE, "merge", str(cfg), str(out), "-j", "2", "--no-progress", "--force"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        # kill somewhere between start-up and the end of a full run; half the trials wait for the
        # temporary directory to appear so that kills land inside the write phase
        if trial % 2 == 0:
            deadline = time.perf_counter() + full * 3
            while (not any(".safemerge-tmp-" in p.name for p in tmp_path.iterdir()) and proc.poll() is None
                   and time.perf_counter() < deadline):
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.5))
        else:
            time.sleep(rng.uniform(0, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            _check_complete(out, reference)
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        leftovers = [p for p in tmp_path.iterdir() if ".safemerge-" in p.name]
        # partial work may only live in hidden temporary siblings
        assert all(p.name.startswith(".out.safemerge-") for p in leftovers), leftovers
    assert sum(outcomes.values()) == 20
    # the next run cleans up temporaries of dead runs and produces the complete output
    if out.exists():
        import shutil

        shutil.rmtree(out)
    r = _cli("merge", str(cfg), str(out), "-j", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    _check_complete(out, reference)
    assert not [p for p in tmp_path.iterdir() if ".safemerge-" in p.name]
