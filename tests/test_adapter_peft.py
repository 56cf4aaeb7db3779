"""PEFT LoRA adapters: safemerge's reader and writer checked against PEFT itself.

Oracle: ``PeftModel.merge_and_unload()`` on a real adapter saved by ``save_pretrained``.
``open_checkpoint("base+adapter")`` must give the same tensors (within 1e-6), and an adapter
written by :func:`safemerge.io.adapter.save_adapter` must load in PEFT and reproduce ΔW.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import warnings
from pathlib import Path

import pytest
import torch

from safemerge.errors import CheckpointError
from safemerge.io.adapter import LoraAdapter, load_adapter, save_adapter
from safemerge.io.references import open_checkpoint
from safemerge.testing import make_tiny_model, save_model

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=5)
    m = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapter_bases")
    out = {}
    for arch in ("llama", "qwen2"):
        out[arch] = save_model(make_tiny_model(arch, seed=1), root / arch)
    out["gpt2"] = save_model(_tiny_gpt2(seed=2), root / "gpt2")
    return out


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _make_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save a real PEFT adapter with random (non-zero) factors; return it and PEFT's merged state dict."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora_kwargs.pop("r", 4), lora_alpha=lora_kwargs.pop("lora_alpha", 8), init_lora_weights=False,
                     **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_load(base_dir), cfg)
        with torch.no_grad():  # make modules_to_save copies differ from the base
            for name, p in pm.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        pm.save_pretrained(str(out))
        merged = pm.merge_and_unload()
    return out, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _assert_streamed_equals(base_dir: Path, adapter_dir: Path, merged: dict[str, torch.Tensor]) -> int:
    ckpt = open_checkpoint(f"{base_dir}+{adapter_dir}")
    changed = 0
    base = open_checkpoint(base_dir)
    for name, want in merged.items():
        got = ckpt.get(name)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6, msg=name)
        if not torch.equal(base.get(name), want.float()):
            changed += 1
    # every stored tensor of the streamed view is covered by PEFT's state dict
    assert set(ckpt.names()) <= set(merged)
    return changed


CASES = {
    "plain_llama": ("llama", dict(target_modules=ATTN_MLP)),
    "rslora_qwen2": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_rslora=True, r=6,
                                   lora_alpha=5)),
    "patterns_llama": (
        "llama",
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 7},
            alpha_pattern={"v_proj": 3, "down_proj": 11},
        ),
    ),
    "embedding_llama": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding_tied_qwen2": ("qwen2", dict(target_modules=["embed_tokens", "o_proj"])),
    "modules_to_save_llama": ("llama", dict(target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "fan_in_fan_out_gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_adapter_equals_peft_merge_and_unload(case, bases, tmp_path):
    arch, kwargs = CASES[case]
    n_targets = len(kwargs["target_modules"])
    adapter_dir, merged = _make_adapter(bases[arch], tmp_path / case, seed=hash(case) % 1000, **kwargs)
    changed = _assert_streamed_equals(bases[arch], adapter_dir, merged)
    # the test is not vacuous: each targeted module type in each of the 2 layers changed
    assert changed >= min(n_targets, 2) * (1 if "embed" in case else 2)


def test_pattern_ranks_and_scalings_are_read(bases, tmp_path):
    _, kwargs = CASES["patterns_llama"]
    adapter_dir, _ = _make_adapter(bases["llama"], tmp_path / "p", seed=3, **dict(kwargs))
    ad = load_adapter(adapter_dir)
    q = ad["model.layers.0.self_attn.q_proj"]
    assert q.rank == 2 and q.scaling == pytest.approx(8 / 2)
    v = ad["model.layers.1.self_attn.v_proj"]
    assert v.rank == 4 and v.scaling == pytest.approx(3 / 4)
    d1 = ad["model.layers.1.mlp.down_proj"]
    assert d1.rank == 7 and d1.scaling == pytest.approx(11 / 7)
    d0 = ad["model.layers.0.mlp.down_proj"]
    assert d0.rank == 4 and d0.scaling == pytest.approx(11 / 4)


def test_rslora_scaling(bases, tmp_path):
    _, kwargs = CASES["rslora_qwen2"]
    adapter_dir, _ = _make_adapter(bases["qwen2"], tmp_path / "rs", seed=4, **dict(kwargs))
    ad = load_adapter(adapter_dir)
    assert ad["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(5 / 6**0.5)


def test_save_adapter_loads_in_peft_and_reproduces_delta(bases, tmp_path):
    """Modules of different ranks (rank_pattern), an embedding LoRA and a GPT-2 fan_in_fan_out adapter."""
    from peft import PeftModel

    g = torch.Generator().manual_seed(7)
    base_dir = bases["llama"]
    base = open_checkpoint(base_dir)
    modules = {}
    for layer, (proj, r) in enumerate([("q_proj", 3), ("v_proj", 5)]):
        for mod in (f"model.layers.{layer}.self_attn.{proj}", f"model.layers.{layer}.mlp.up_proj"):
            out_dim, in_dim = base.shape(f"{mod}.weight")
            modules[mod] = (torch.randn(r, in_dim, generator=g) * 0.1, torch.randn(out_dim, r, generator=g) * 0.1)
    out_dim, in_dim = base.shape("model.layers.1.mlp.down_proj.weight")
    modules["model.layers.1.mlp.down_proj"] = (torch.randn(2, in_dim, generator=g) * 0.1,
                                               torch.randn(out_dim, 2, generator=g) * 0.1)
    vocab, dim = base.shape("model.embed_tokens.weight")
    modules["model.embed_tokens"] = (torch.randn(4, vocab, generator=g) * 0.1, torch.randn(dim, 4, generator=g) * 0.1)
    out = tmp_path / "written"
    save_adapter(out, modules, base_model_name_or_path=str(base_dir), embedding_modules={"model.embed_tokens"})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["r"] in (3, 5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(_load(base_dir), str(out))
        merged = pm.merge_and_unload().state_dict()
    for mod, (A, B) in modules.items():
        delta = B @ A
        if mod == "model.embed_tokens":
            delta = delta.T
        got = merged[f"{mod}.weight"] - base.get(f"{mod}.weight")
        torch.testing.assert_close(got, delta, rtol=0, atol=1e-6, msg=mod)
    # untouched tensors stay untouched
    torch.testing.assert_close(merged["model.layers.0.self_attn.k_proj.weight"],
                               base.get("model.layers.0.self_attn.k_proj.weight"), rtol=0, atol=0)
    # and safemerge reads back what it wrote
    back = load_adapter(out)
    assert {m: back[m].rank for m in back} == {m: A.shape[0] for m, (A, _) in modules.items()}
    for mod, (A, B) in modules.items():
        d = back[mod].delta()
        torch.testing.assert_close(d, (B @ A).T if mod == "model.embed_tokens" else B @ A, rtol=0, atol=1e-6)


def test_save_adapter_fan_in_fan_out_roundtrip(bases, tmp_path):
    """Factors taken from a PEFT GPT-2 (Conv1D) adapter, rescaled to s=1, written and re-loaded by PEFT."""
    from peft import PeftModel

    src, merged_src = _make_adapter(bases["gpt2"], tmp_path / "src", seed=9, target_modules=["c_attn"],
                                    fan_in_fan_out=True)
    ad = load_adapter(src)
    factors = {m: ad[m].scaled_factors() for m in ad}
    out = tmp_path / "copy"
    save_adapter(out, factors, fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(_load(bases["gpt2"]), str(out)).merge_and_unload().state_dict()
    for m in ad:
        w = f"{m}.weight"
        torch.testing.assert_close(merged[w], merged_src[w], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def good_adapter(bases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "ad"
    _make_adapter(bases["llama"], out, seed=11, target_modules=["q_proj", "v_proj"])
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_adapter_for_missing_module_is_refused(bases, good_adapter, tmp_path):
    """An adapter trained on a model with a module the base lacks (Qwen2 adapter, Llama base with other names)."""
    ad = _copy(good_adapter, tmp_path / "ad")
    from safetensors.torch import load_file, save_file

    t = load_file(str(ad / "adapter_model.safetensors"))
    t = {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in t.items()}
    save_file(t, str(ad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="qkv_proj.*not in the base model"):
        open_checkpoint(f"{bases['llama']}+{ad}")


def test_adapter_with_wrong_shapes_is_refused(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    ad, _ = _make_adapter(bases["gpt2"], tmp_path / "g", seed=1, target_modules=["c_attn"], fan_in_fan_out=True)
    t = load_file(ad / "adapter_model.safetensors")
    t = {k: (v[:, :-1].contiguous() if "lora_A" in k else v) for k, v in t.items()}  # one input column short
    save_file(t, str(ad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        open_checkpoint(f"{bases['gpt2']}+{ad}")


def test_fan_in_fan_out_follows_the_layer_type_as_peft_does(bases, tmp_path):
    """PEFT applies fan_in_fan_out to Conv1D layers whatever the flag says (and never to nn.Linear)."""
    ad, merged = _make_adapter(bases["gpt2"], tmp_path / "g", seed=1, target_modules=["c_attn"], fan_in_fan_out=True)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    ck = open_checkpoint(f"{bases['gpt2']}+{ad}")
    for name, want in merged.items():
        if "c_attn.weight" in name:
            torch.testing.assert_close(ck.get(name), want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "corruption",
    ["truncated_weights", "garbage_weights", "bad_json", "no_config", "no_weights", "rank_mismatch", "half_module",
     "dora", "lora_bias"],
)
def test_corrupt_adapter_is_refused(bases, good_adapter, tmp_path, corruption):
    from safetensors.torch import load_file, save_file

    ad = _copy(good_adapter, tmp_path / "ad")
    w = ad / "adapter_model.safetensors"
    c = ad / "adapter_config.json"
    cfg = json.loads(c.read_text())
    if corruption == "truncated_weights":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) - 100])
    elif corruption == "garbage_weights":
        w.write_bytes(b"\x00not a safetensors file at all")
    elif corruption == "bad_json":
        c.write_text("{ this is not json")
    elif corruption == "no_config":
        c.unlink()
    elif corruption == "no_weights":
        w.unlink()
    elif corruption == "rank_mismatch":
        cfg["r"] = 8
        c.write_text(json.dumps(cfg))
    elif corruption == "half_module":
        t = load_file(str(w))
        t = {k: v for k, v in t.items() if not ("layers.0.self_attn.q_proj" in k and "lora_B" in k)}
        save_file(t, str(w))
    elif corruption == "dora":
        cfg["use_dora"] = True
        c.write_text(json.dumps(cfg))
    elif corruption == "lora_bias":
        t = load_file(str(w))
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(32)
        save_file(t, str(w))
    with pytest.raises(CheckpointError):
        ck = open_checkpoint(f"{bases['llama']}+{ad}")
        for name in ck.names():  # lazily-detected problems surface on read
            ck.get(name)


def test_lora_adapter_is_lazy_mapping(good_adapter):
    ad = LoraAdapter(good_adapter)
    assert len(ad) == 4 and ad.r == 4 and ad.lora_alpha == 8
    assert set(ad.weight_names) == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj",
                                                                                                         "v_proj")}
