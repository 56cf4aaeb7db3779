"""Byte-identical outputs: the SHA-256 of every file that ``merge``, ``safemerge``, ``safelora``,
``resta`` and ``mergealign`` write on fixed tiny inputs, pinned.

The pins were computed on the code before the issue-12 redesign (one engine under everything);
the redesign moves code, it must not move bits. A pin may only change in a commit that proves
the new bits are a fix and says so (see ``tests/fixtures/output_pins.json`` history).

The inputs are built from seeded RNG draws and exact subtractions only (no SVD, no PEFT), so
they are the same bits on every machine. Files whose bytes come from float32 GEMMs — the ρ values in
``safemerge.json`` and the card of the SafeMERGE cases, every file of the SafeLoRA cases (B projected by
C) — depend on the BLAS kernel the CPU gets (an Intel Sapphire Rapids machine's MKL rounds them differently
from an AMD EPYC's), so they are not compared with the pins: :data:`GEMM_DEPENDENT` lists them, and the test
instead runs those cases a second time and requires the same bytes (deterministic on one machine); their
values are checked against dense formulas with tolerances in ``test_safety_*``. Every other file is pinned.
Text files have the temporary directory replaced by ``<ROOT>`` and the ``transformers_version`` that
``save_pretrained`` stamps into ``config.json`` / ``generation_config.json`` replaced by ``<VERSION>`` before hashing
(a transformers release changes that string and nothing else: 5.24.0 → 5.25.0 was checked file by file).

Regenerate (only with a justification in the commit message)::

    SAFEMERGE_REPIN=1 python -m pytest tests/test_output_pins.py -p no:cacheprovider -q
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

PINS = Path(__file__).parent / "fixtures" / "output_pins.json"
#: ``case/file`` patterns whose bytes depend on the CPU's float32 GEMM kernel (see the module docstring)
GEMM_DEPENDENT = ("safelora_*/*", "safemerge_*/safemerge.json", "safemerge_*/README.md")
TEXT_SUFFIXES = {".json", ".md", ".yml", ".yaml", ".jinja", ".txt"}
TRANSFORMERS_VERSION = re.compile(rb'"transformers_version": "[^"]*"')


def _lora(g: torch.Generator, out_dim: int, in_dim: int, r: int, steer: torch.Tensor | None) -> tuple:
    """``(A, B)`` from seeded draws; ``steer`` (V's first r columns) makes B lie in V's span → high ρ."""
    A = torch.randn(r, in_dim, generator=g) * 0.1
    B = steer[:, :r] * 0.5 if steer is not None else torch.randn(out_dim, r, generator=g) * 0.05
    return A.contiguous(), B.contiguous()


@pytest.fixture(scope="module")
def pin_world(tmp_path_factory) -> dict[str, Path]:
    """base, aligned (= base + seeded noise), two full fine-tunes, a task and a safety LoRA."""
    from safemerge.io.adapter import save_adapter
    from safemerge.io.checkpoint import Checkpoint
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    root = tmp_path_factory.mktemp("pins")
    model = make_tiny_model("llama", seed=0, hidden=32, layers=2)
    paths = {"base": save_model(model, root / "base")}
    perturb_model(model, seed=1, scale=0.02)
    paths["aligned"] = save_model(model, root / "aligned")
    perturb_model(model, seed=2, scale=0.01)
    paths["ft_full"] = save_model(model, root / "ft_full")
    perturb_model(model, seed=3, scale=0.01, only="mlp")
    paths["safety_full"] = save_model(model, root / "safety_full")
    al, ba = Checkpoint(paths["aligned"]), Checkpoint(paths["base"])
    g = torch.Generator().manual_seed(4)
    for name, r, targets in (("ft", 4, ("q_proj", "v_proj", "up_proj")), ("safety", 2, ("q_proj", "v_proj", "o_proj"))):
        factors = {}
        for layer in range(2):
            for t in targets:
                part = "mlp" if t.endswith("up_proj") else "self_attn"
                module = f"model.layers.{layer}.{part}.{t}"
                V = al.get(f"{module}.weight") - ba.get(f"{module}.weight")
                steer = V if (name == "ft" and layer == 1) else None
                factors[module] = _lora(g, V.shape[0], V.shape[1], r, steer)
        save_adapter(root / name, factors, base_model_name_or_path=str(paths["aligned"]))
        paths[name] = root / name
    g = torch.Generator().manual_seed(5)
    factors = {}
    for layer in range(2):
        for t in ("q_proj", "v_proj", "up_proj"):
            part = "mlp" if t == "up_proj" else "self_attn"
            module = f"model.layers.{layer}.{part}.{t}"
            shape = al.shape(f"{module}.weight")
            factors[module] = _lora(g, shape[0], shape[1], 4, None)
    save_adapter(root / "safety_r4", factors, base_model_name_or_path=str(paths["aligned"]))
    paths["safety_r4"] = root / "safety_r4"
    paths["root"] = root
    return paths


def _merge_yaml(w: dict[str, Path], method: str, params: str, dtype: str = "float32") -> str:
    d1, d2 = ("", "") if method == "linear" else (", density: 0.5", ", density: 0.7")
    base = "" if method == "linear" else f"base_model: {w['base']}\n"
    return (f"merge_method: {method}\n{base}dtype: {dtype}\n"
            f"models:\n  - model: {w['aligned']}\n    parameters: {{weight: 0.6{d1}}}\n"
            f"  - model: {w['ft_full']}\n    parameters: {{weight: 0.4{d2}}}\n" + params)


def _cases(w: dict[str, Path]) -> dict[str, list]:
    sm = ["safemerge", "--base", w["base"], "--aligned", w["aligned"], "--finetuned", w["ft"], "--safety", w["safety"],
          "--tau", "0.8", "--alpha", "0.7"]
    sl = ["safelora", "--base", w["base"], "--aligned", w["aligned"]]
    resta = ["resta", "--unaligned", w["base"], "--aligned", w["aligned"], "--beta", "0.3"]
    return {
        "merge_linear": ["merge", ("yaml", "linear", "")],
        "merge_ties": ["merge", ("yaml", "ties", "parameters: {normalize: true}\n")],
        "merge_dare_ties_seed3": ["merge", ("yaml", "dare_ties", ""), "--seed", "3"],
        "merge_dare_linear_seed1_bf16": ["merge", ("yaml", "dare_linear", "", "bfloat16"), "--seed", "1"],
        "merge_della_seed2": ["merge", ("yaml", "della", "parameters: {epsilon: 0.1}\n"), "--seed", "2"],
        "safemerge_adapter_linear": sm,
        "safemerge_adapter_reference": [*sm[:8], w["safety_r4"], *sm[9:], "--compat", "reference"],
        "safemerge_adapter_dare_ties": [*sm, "--strategy", "dare_ties", "--density", "0.6", "--seed", "5"],
        "safemerge_merge_into_linear": [*sm, "--merge-into", w["aligned"]],
        "safemerge_merge_into_ties": [*sm, "--merge-into", w["aligned"], "--strategy", "ties"],
        "safemerge_full_models_dare_linear": [*sm[:6], w["ft_full"], "--safety", w["safety_full"], *sm[9:],
                                              "--strategy", "dare_linear", "--seed", "2"],
        "safelora_adapter_threshold": [*sl, "--finetuned", w["ft"], "--tau", "0.8"],
        "safelora_merge_into_number": [*sl, "--finetuned", w["ft"], "--mode", "number", "-k", "3",
                                       "--merge-into", w["aligned"]],
        "safelora_full_model": [*sl, "--finetuned", w["ft_full"], "--tau", "0.7"],
        "resta_full": [*resta, "--finetuned", w["ft_full"]],
        "resta_adapter_dare_seed4": [*resta, "--finetuned", w["ft"], "--dare-density", "0.8", "--seed", "4"],
        "resta_bf16": [*resta, "--finetuned", w["ft_full"], "--dtype", "bfloat16"],
        "mergealign": ["mergealign", "--pretrained", w["base"], "--domain", w["ft_full"], "--aligned", w["aligned"],
                       "--lambda-domain", "0.7", "--lambda-aligned", "0.4"],
        "mergealign_adapter": ["mergealign", "--pretrained", w["base"], "--domain", f"{w['aligned']}+{w['ft']}",
                               "--aligned", w["aligned"]],
    }


def _digest(path: Path, root: Path) -> str:
    data = path.read_bytes()
    if path.suffix in TEXT_SUFFIXES:
        data = data.replace(str(root).encode(), b"<ROOT>")
        data = TRANSFORMERS_VERSION.sub(rb'"transformers_version": "<VERSION>"', data)
    return hashlib.sha256(data).hexdigest()


def _run_case(w: dict[str, Path], name: str, args: list, capsys) -> dict[str, str]:
    out = w["root"] / "out" / name
    argv: list = []
    for a in args:
        if isinstance(a, tuple):
            cfg = w["root"] / f"{name}.yml"
            cfg.write_text(_merge_yaml(w, *a[1:]))
            argv += [cfg, out]
        else:
            argv.append(a)
    if argv[0] != "merge":
        argv += ["-o", out]
    code, _, err = run_cli(capsys, *argv, "-q", "--no-progress", *(["-j", "2"] if argv[0] == "merge" else []))
    assert code == 0, err
    return {p.relative_to(out).as_posix(): _digest(p, w["root"]) for p in sorted(out.rglob("*")) if p.is_file()}


def test_outputs_byte_identical_to_pins(pin_world, capsys):
    got = {name: _run_case(pin_world, name, args, capsys) for name, args in _cases(pin_world).items()}
    merged = json.loads((pin_world["root"] / "out" / "safemerge_adapter_linear" / "safemerge.json").read_text())
    decisions = {layer["merged"] for layer in merged["layers"]}
    assert decisions == {True, False}, "the fixture must exercise both sides of ρ < τ"
    if os.environ.get("SAFEMERGE_REPIN"):
        PINS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"re-pinned {len(got)} cases into {PINS}")
    want = json.loads(PINS.read_text())
    assert sorted(got) == sorted(want)
    diff = {f"{case}/{f}" for case in want for f in set(want[case]) | set(got[case])
            if want[case].get(f) != got[case].get(f) and not _gemm_dependent(f"{case}/{f}")}
    assert not diff, f"outputs changed: {sorted(diff)}"
    again = {}
    for name, args in _cases(pin_world).items():
        if any(_gemm_dependent(f"{name}/{f}") for f in got[name]):
            shutil.rmtree(pin_world["root"] / "out" / name)
            again[name] = _run_case(pin_world, name, args, capsys)
    assert again, "no case has GEMM-dependent files: GEMM_DEPENDENT matches nothing"
    assert {n: got[n] for n in again} == again, "a second run on the same machine wrote other bytes"


def _gemm_dependent(case_file: str) -> bool:
    return any(fnmatch.fnmatch(case_file, pattern) for pattern in GEMM_DEPENDENT)
