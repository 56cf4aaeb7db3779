"""Merged outputs are real Hugging Face models: every supported layout loads with
``AutoModelForCausalLM`` and generates; sharded output, tokenizer_source and chat_template work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safemerge.api import merge  # noqa: E402
from safemerge.io.checkpoint import Checkpoint  # noqa: E402
from safemerge.options import RunOptions  # noqa: E402
from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model, save_model  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_merged_model_loads_and_generates(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = save_model(make_tiny_model(arch, seed=0), tmp_path / "base")
    a = save_model(perturb_model(make_tiny_model(arch, seed=0), seed=1), tmp_path / "a")
    b = save_model(perturb_model(make_tiny_model(arch, seed=0), seed=2), tmp_path / "b")
    cfg = (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
           f"  - model: {a}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
           f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\nout_dtype: bfloat16\n")
    out = merge(cfg, tmp_path / "out", options=RunOptions(progress=False))
    assert set(Checkpoint(out).names()) == set(Checkpoint(base).names())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "merge_method: ties" in card and "- safemerge" in card
    assert (out / "mergekit_config.yml").read_text() == cfg  # the user's YAML, byte for byte


def test_sharded_output_and_tokenizer_source(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    a = save_model(make_tiny_model("llama", seed=0, hidden=64), tmp_path / "a")
    tok2 = build_tokenizer(128, words=["special", "words"])
    b = save_model(perturb_model(make_tiny_model("llama", seed=0, hidden=64), seed=1), tmp_path / "b", tokenizer=tok2)
    cfg = (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    "
        f"parameters: {{weight: 0.5}}\n"
        f"tokenizer_source: {b}\nchat_template: chatml\n"
    )
    out = merge(cfg, tmp_path / "out", options=RunOptions(progress=False), out_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).exists() for s in shards)
    assert shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(a)
    merged = AutoModelForCausalLM.from_pretrained(out)
    pa = dict(ref.named_parameters())
    pb = dict(AutoModelForCausalLM.from_pretrained(b).named_parameters())
    # tokenizer_source re-indexes a's vocabulary rows to b's tokenizer (mergekit semantics;
    # tests/test_vocab_union.py checks it against mergekit): a token a lacks takes b's row
    from transformers import AutoTokenizer

    va, vb = AutoTokenizer.from_pretrained(a).get_vocab(), AutoTokenizer.from_pretrained(b).get_vocab()
    for name, p in merged.named_parameters():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            for tok, i in vb.items():
                row_a = pa[name][va[tok]] if tok in va else pb[name][i]
                torch.testing.assert_close(p[i], (row_a + pb[name][i]) / 2, atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(p, (pa[name] + pb[name]) / 2, atol=1e-6, rtol=0)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == vb
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
