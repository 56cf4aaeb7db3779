"""Non-LoRA parts of a fine-tuned PEFT adapter survive SafeMERGE and SafeLoRA (issue 17, item 1).

PEFT adapters can train parameters outside the LoRA product: ``modules_to_save`` (``lm_head``),
biases (``bias="lora_only"`` / ``"all"``) and trainable tokens (``trainable_token_indices``).
They are the fine-tune's own and are carried over unchanged — in the adapter output, with
``--merge-into`` and through the YAML ``merge_method: safemerge`` — never dropped.

Oracle: PEFT itself. The fine-tuned adapter merged by ``PeftModel.merge_and_unload`` gives the
expected value of every non-LoRA tensor; PEFT's ``get_delta_weight`` gives ΔW_f and ΔW_s.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from safemerge.cli import main
from safemerge.io.checkpoint import Checkpoint
from safemerge.safety import api

LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
KINDS = {
    "modules_to_save": dict(modules_to_save=["lm_head"]),
    "bias_lora_only": dict(bias="lora_only"),
    "bias_all": dict(bias="all"),
    "trainable_tokens": dict(trainable_token_indices=[3, 7, 9]),
}


def _peft_adapter(model_dir: Path, out: Path, seed: int, **kw) -> Path:
    """A real PEFT adapter with random factors and every non-LoRA trainable parameter perturbed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False, lora_dropout=0.0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), cfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad and "lora_" not in name:
                    p.add_(torch.randn_like(p) * 0.1)
        pm.save_pretrained(out)
    return out


def _peft_merged(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The model PEFT produces: ``PeftModel.from_pretrained(...).merge_and_unload()``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                       adapter_dir)
        return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny Qwen2 (q/k/v biases, untied lm_head): base, aligned, a safety LoRA and one adapter per kind."""
    from safety_world import peft_deltas

    from safemerge.testing import make_tiny_model, perturb_model, save_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("non_lora")
    model = make_tiny_model("qwen2", seed=0, tie=False)
    base = save_model(model, root / "base")
    aligned = save_model(perturb_model(model, seed=1, scale=0.02), root / "aligned")
    safety = _peft_adapter(aligned, root / "safety", seed=5)
    fts = {k: _peft_adapter(aligned, root / k, seed=10 + i, **kw) for i, (k, kw) in enumerate(KINDS.items())}
    return {"base": base, "aligned": aligned, "safety": safety, "ft": fts, "root": root,
            "d_s": peft_deltas(aligned, safety)}


def _lora_weight_names(world, kind) -> dict[str, str]:
    from safemerge.io.adapter import load_adapter

    return dict(load_adapter(world["ft"][kind]).weight_names)


def _assert_safemerge_model(world, kind, got: dict[str, torch.Tensor], alpha: float) -> None:
    """LoRA weights: aligned + α ΔW_f + (1−α) ΔW_s (all merged, τ = 1); everything else: PEFT's merged fine-tune."""
    from safety_world import peft_deltas

    ft_merged = _peft_merged(world["aligned"], world["ft"][kind])
    aligned = Checkpoint(world["aligned"])
    d_f = peft_deltas(world["aligned"], world["ft"][kind])
    lora = _lora_weight_names(world, kind)
    changed_non_lora = 0
    for name, want in ft_merged.items():
        if name not in got:
            continue  # tied/aliased names
        if name in lora:
            m = lora[name]
            want = aligned.get(name) + alpha * d_f[m] + (1 - alpha) * world["d_s"][m]
        elif not torch.equal(want, aligned.get(name)):
            changed_non_lora += 1
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=f"{kind}: {name}")
    assert changed_non_lora >= 1, f"{kind}: the adapter's non-LoRA part is not visible (vacuous test)"


def _run(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert not exc.code, exc.code


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_safemerge_adapter_output_keeps_non_lora_parts(world, kind, tmp_path):
    """The merged adapter, loaded and merged by PEFT, keeps lm_head / biases / token rows of the fine-tune."""
    out = tmp_path / "merged"
    _run("safemerge", "--base", world["base"], "--aligned", world["aligned"], "--finetuned", world["ft"][kind],
         "--safety", world["safety"], "--tau", "1.0", "--alpha", "0.6", "-o", out, "--no-progress", "-q")
    _assert_safemerge_model(world, kind, _peft_merged(world["aligned"], out), alpha=0.6)
    card = (out / "README.md").read_text()
    assert "Carried over unchanged" in card


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merge_into_and_yaml_equal_the_adapter_output(world, kind, tmp_path):
    """--merge-into and the YAML method give the same model as the adapter output merged by PEFT."""
    _run("safemerge", "--base", world["base"], "--aligned", world["aligned"], "--finetuned", world["ft"][kind],
         "--safety", world["safety"], "--tau", "1.0", "--alpha", "0.6", "-o", tmp_path / "full",
         "--merge-into", world["aligned"], "--no-progress", "-q")
    full = Checkpoint(tmp_path / "full")
    got = {n: full.get(n) for n in full.names()}
    _assert_safemerge_model(world, kind, got, alpha=0.6)

    al = str(world["aligned"])
    cfg = {"merge_method": "safemerge", "base_model": str(world["base"]), "dtype": "float32",
           "models": [{"model": al}, {"model": f"{al}+{world['ft'][kind]}"}, {"model": f"{al}+{world['safety']}"}],
           "parameters": {"tau": 1.0, "alpha": 0.6}}
    (tmp_path / "sm.yml").write_text(yaml.safe_dump(cfg))
    _run("merge", tmp_path / "sm.yml", tmp_path / "yaml", "--no-progress")
    merged = Checkpoint(tmp_path / "yaml")
    assert set(merged.names()) == set(full.names())
    for n in full.names():
        torch.testing.assert_close(merged.get(n), got[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["modules_to_save", "bias_lora_only", "trainable_tokens"])
def test_safelora_keeps_non_lora_parts(world, kind, tmp_path):
    """SafeLoRA's adapter and full-model outputs keep the non-LoRA parts (PEFT merge of the output = PEFT merge of
    the input there)."""
    out = api.safelora(base=world["base"], aligned=world["aligned"], finetuned=world["ft"][kind], out=tmp_path / "a",
                       mode="threshold", tau=1.0)
    assert out.carried_over and len(out.projected) == len(out.scores)
    want = _peft_merged(world["aligned"], world["ft"][kind])
    got = _peft_merged(world["aligned"], tmp_path / "a")
    full = Checkpoint(api.safelora(base=world["base"], aligned=world["aligned"], finetuned=world["ft"][kind],
                                   out=tmp_path / "m", mode="threshold", tau=1.0, merge_into=world["aligned"]).out)
    lora = _lora_weight_names(world, kind)
    for name in out.carried_over:
        assert name not in lora
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)
        torch.testing.assert_close(full.get(name), want[name], rtol=0, atol=1e-7)
    for name in lora:  # the projected LoRA weights agree between the two outputs
        torch.testing.assert_close(full.get(name), got[name], rtol=1e-5, atol=1e-6)


def test_non_lora_parts_that_cannot_be_carried_are_refused(world, tmp_path, capsys):
    """A full block weight in modules_to_save, and lm_head saved for a model that ties it: exit 2, nothing written."""
    from safemerge.testing import make_tiny_model, save_model

    block = _peft_adapter(world["aligned"], tmp_path / "block", seed=30, modules_to_save=["gate_proj"])
    common = ["--base", world["base"], "--aligned", world["aligned"], "--safety", world["safety"], "--no-progress"]
    for adapter, needle in ((block, "full block weight"),):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in ["safemerge", *common, "--finetuned", adapter, "-o", tmp_path / "out"]])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    tied = make_tiny_model("qwen2", seed=0, tie=True)
    tied_base = save_model(tied, tmp_path / "tied_base")
    from safemerge.testing import perturb_model

    tied_aligned = save_model(perturb_model(tied, seed=1, scale=0.02), tmp_path / "tied_aligned")
    head = _peft_adapter(tied_aligned, tmp_path / "head", seed=31, modules_to_save=["lm_head"])
    tied_safety = _peft_adapter(tied_aligned, tmp_path / "tied_safety", seed=32)
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ["safemerge", "--base", tied_base, "--aligned", tied_aligned, "--safety", tied_safety,
                               "--finetuned", head, "-o", tmp_path / "out2", "--no-progress"]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "does not store separately" in err and "Traceback" not in err
    assert not (tmp_path / "out2").exists()
