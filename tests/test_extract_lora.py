"""``safemerge extract-lora``: truncated SVD of W_ft − W_base as a PEFT adapter (issue 14, item 5).

Oracles: a fine-tune built as ``base + B₀A₀`` with a known rank-3 ``B₀A₀`` per linear weight
(extraction must be exact to float tolerance), PEFT's own ``merge_and_unload`` of the extracted
adapter (must equal the fine-tune), the Eckart–Young error from a dense SVD, and
``mergekit-extract-lora`` 0.1.5 on the same models (same low-rank products B A).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from safemerge.cli import main
from safemerge.extract import extract_lora
from safemerge.io.checkpoint import Checkpoint
from safemerge.io.references import open_checkpoint

TRUE_RANK = 3


def _low_rank_finetune(model, seed: int):
    """Add a known rank-3 update to every linear weight, the embeddings and lm_head; change norms and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                rows, cols = mod.weight.shape
                B0 = torch.randn(rows, TRUE_RANK, generator=g) * 0.05
                A0 = torch.randn(TRUE_RANK, cols, generator=g) * 0.05
                mod.weight.add_(B0 @ A0)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.01)
        model.model.norm.weight.add_(0.1)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safemerge.testing import make_tiny_model, save_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("extract")
    out = {}
    for arch in ("llama", "qwen2"):
        m = make_tiny_model(arch, seed=0, tie=False)
        out[f"{arch}_base"] = save_model(m, root / f"{arch}_base")
        out[f"{arch}_ft"] = save_model(_low_rank_finetune(m, seed=1), root / f"{arch}_ft")
    return out


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("embed_lora", [False, True])
def test_extraction_of_a_low_rank_delta_is_exact_in_peft(models, arch, embed_lora, tmp_path):
    """PEFT's merge of base + extracted adapter equals the fine-tune; ranks are the true rank with --sv-epsilon."""
    base, ft = models[f"{arch}_base"], models[f"{arch}_ft"]
    res = extract_lora(ft, base, tmp_path / "a", max_rank=16, sv_epsilon=1e-4, embed_lora=embed_lora)
    assert len(res.lora) == 2 * 7 + (2 if embed_lora else 0) and all(m.rank == TRUE_RANK for m in res.lora)
    assert res.max_relative_error < 1e-5
    merged = _peft_merged(base, tmp_path / "a")
    want = Checkpoint(ft)
    for name in want.names():
        torch.testing.assert_close(merged[name], want.get(name), rtol=0, atol=2e-6, msg=name)
    # safemerge's own reader agrees (base+adapter streamed)
    streamed = open_checkpoint(f"{base}+{tmp_path / 'a'}")
    for name in want.names():
        torch.testing.assert_close(streamed.get(name), merged[name], rtol=0, atol=1e-6, msg=name)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    if embed_lora:
        assert [m.name for m in res.modules if m.kind == "lora_embedding"] == ["model.embed_tokens.weight"]
        assert cfg["modules_to_save"] == ["model.norm"]
    else:
        assert {"lm_head", "model.embed_tokens", "model.norm"} <= set(cfg["modules_to_save"])
    assert cfg["bias"] == ("all" if arch == "qwen2" else "none")


def test_truncation_error_is_eckart_young(models, tmp_path):
    """At rank 1 the reported error equals ‖ΔW − BA‖_F/‖ΔW‖_F computed densely, and the card lists it."""
    base, ft = models["llama_base"], models["llama_ft"]
    res = extract_lora(ft, base, tmp_path / "r1", max_rank=1)
    merged = _peft_merged(base, tmp_path / "r1")
    b, f = Checkpoint(base), Checkpoint(ft)
    for m in (m for m in res.modules if m.kind == "lora"):
        delta = f.get(m.name) - b.get(m.name)
        residual = delta - (merged[m.name] - b.get(m.name))
        dense_err = float(torch.linalg.vector_norm(residual) / torch.linalg.vector_norm(delta))
        assert m.rank == 1 and m.relative_error == pytest.approx(dense_err, rel=1e-3, abs=1e-6)
        s = torch.linalg.svdvals(delta)
        assert m.relative_error == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)
        assert f"{m.relative_error:.3e}" in (tmp_path / "r1" / "README.md").read_text()


def test_extraction_is_byte_identical_across_runs_and_thread_counts(models, tmp_path):
    base, ft = models["qwen2_base"], models["qwen2_ft"]
    extract_lora(ft, base, tmp_path / "a", max_rank=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        extract_lora(ft, base, tmp_path / "b", max_rank=4)
    finally:
        torch.set_num_threads(threads)
    for f in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_same_low_rank_products_as_mergekit(models, tmp_path):
    """mergekit-extract-lora on the same models gives the same B A per linear module."""
    exe = shutil.which("mergekit-extract-lora", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("mergekit-extract-lora is not installed")
    base, ft = models["llama_base"], models["llama_ft"]
    proc = subprocess.run([exe, "--model", str(ft), "--base-model", str(base), "--out-path", str(tmp_path / "mk"),
                           "--max-rank", "2"], capture_output=True, text=True, env={**os.environ,
                                                                                    "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    extract_lora(ft, base, tmp_path / "ours", max_rank=2)
    from safemerge.io.adapter import load_adapter

    mk, ours = load_adapter(tmp_path / "mk"), load_adapter(tmp_path / "ours")
    assert set(ours) <= set(mk)
    for m in ours:
        torch.testing.assert_close(ours[m].delta(), mk[m].delta(), rtol=1e-4, atol=1e-6, msg=m)


def test_cli_and_bad_inputs(models, tmp_path, capsys):
    base, ft = models["llama_base"], models["llama_ft"]
    main_args = ["extract-lora", str(ft), "--base", str(base), "-o", str(tmp_path / "cli"), "--rank", "4",
                 "--no-progress"]
    main(main_args)
    err = capsys.readouterr().err
    assert "14 LoRA modules" in err and (tmp_path / "cli" / "README.md").exists()
    for args, needle in (
        (main_args, "exists"),  # no overwrite without --force
        (["extract-lora", str(models["qwen2_ft"]), "--base", str(base), "-o", str(tmp_path / "x")], "has no tensor"),
        (["extract-lora", str(tmp_path / "cli"), "--base", str(base), "-o", str(tmp_path / "x")],
         "already a LoRA adapter"),
        (["extract-lora", str(ft), "--base", str(base), "-o", str(tmp_path / "x"), "--max-rank", "0"], "--max-rank"),
        (["extract-lora", str(base), "--base", str(base), "-o", str(tmp_path / "x")], "does not differ"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(args + ["--no-progress"] if "--no-progress" not in args else args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err and "Traceback" not in err, err
        assert not (tmp_path / "x").exists()
