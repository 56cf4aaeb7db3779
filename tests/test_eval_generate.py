"""Generation backends: batched == one-at-a-time, determinism, stops, adapters, loading rules."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safemerge.errors import SafemergeError  # noqa: E402
from safemerge.evaluate.generate import (  # noqa: E402
    HFGenerator,
    load_generator,
    resolve_backend,
    truncate_at_stop,
)

PROMPTS = ["a b c d e f g h i j k l", "a b c", "what is 2 + 2 ?", "x", "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6", "z y",
           [{"role": "system", "content": "q r s"}, {"role": "user", "content": "t u"}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model, save_model

    torch.set_num_threads(1)
    model = perturb_model(make_tiny_model("llama", hidden=64), seed=1, scale=0.2)  # prompt-sensitive outputs
    tok = build_tokenizer(128)
    path = save_model(model, tmp_path_factory.mktemp("gen") / "model", tokenizer=tok)
    return model, tok, path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_equals_one_at_a_time(arch):
    import torch

    from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model

    torch.set_num_threads(1)
    model = perturb_model(make_tiny_model(arch, hidden=64), seed=1, scale=0.2)
    gen = load_generator(model, tokenizer=build_tokenizer(128), backend="hf", device="cpu")
    batched = gen.generate(PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS), progress=False)
    pairs = gen.generate(PROMPTS, max_new_tokens=12, batch_size=2, progress=False)
    single = [gen.generate([p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single == pairs
    assert len(set(single)) >= 4  # outputs depend on the prompt, so a padding bug would show
    again = gen.generate(PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    assert again == batched  # deterministic


SYSTEM = "you are a careful assistant"
SHARED = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}]
          for u in ("a b c", "what is 2 + 2 ?", "x", "1 2 3 4 5 6 7 8 9 0", "z y", "a b c d e f g")]


def test_shared_prefix_length():
    from safemerge.evaluate.generate import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every row keeps a token of its own
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([[], [1]]) == 0


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_shared_prefix_runs_once_and_changes_no_token(arch, monkeypatch):
    """Rows that begin with the same system turn share its KV cache; the token ids equal those of the plain
    padded batch and of each prompt alone (fp32)."""
    import torch

    import safemerge.evaluate.generate as G
    from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model

    torch.set_num_threads(1)
    model = perturb_model(make_tiny_model(arch, hidden=64), seed=1, scale=0.2)
    gen = load_generator(model, tokenizer=build_tokenizer(128), backend="hf", device="cpu")
    seen: list[int] = []
    real = G.shared_prefix_length
    monkeypatch.setattr(G, "shared_prefix_length", lambda batch: seen.append(real(batch)) or seen[-1])
    shared = gen.generate(SHARED, max_new_tokens=12, batch_size=len(SHARED), progress=False)
    assert seen and seen[0] >= G.MIN_SHARED_PREFIX  # the prefix path ran
    monkeypatch.setattr(G, "MIN_SHARED_PREFIX", 10**6)
    plain = gen.generate(SHARED, max_new_tokens=12, batch_size=len(SHARED), progress=False)
    single = [gen.generate([p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in SHARED]
    assert shared == plain == single
    assert len(set(single)) >= 3  # outputs depend on the prompt, so a position or mask bug would show


def test_padding_is_left_and_ids_match(tiny):
    """Token ids of a padded batch equal those of each prompt alone (fp32)."""
    import torch

    model, tok, _ = tiny
    gen = HFGenerator(model, tok)
    texts = [gen.render(p) for p in PROMPTS[:4]]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch_out = gen._generate_batch(enc, 8, None)
    single_out = [gen._generate_batch([e], 8, None)[0] for e in enc]
    assert batch_out == single_out
    with torch.no_grad():  # reference: plain greedy loop without padding, one prompt
        ids = torch.tensor([enc[1]])
        for _ in range(8):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        ref = tok.decode(ids[0, len(enc[1]):].tolist(), skip_special_tokens=True).strip()
    assert single_out[1] == ref


def test_chat_template_applied(tiny):
    model, tok, _ = tiny
    gen = HFGenerator(model, tok)
    assert gen.render("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert gen.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]).startswith(
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu")


def test_stop_strings(tiny):
    model, tok, _ = tiny
    gen = HFGenerator(model, tok)
    full = gen.generate(PROMPTS[:3], max_new_tokens=12, batch_size=3, progress=False)
    word = next(w for w in full[0].split()[1:] if w)
    stopped = gen.generate(PROMPTS[:3], max_new_tokens=12, batch_size=3, progress=False, stop=[word])
    assert stopped[0] == full[0][: full[0].find(word)].strip()
    for f, s in zip(full, stopped):
        assert f.startswith(s)
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == "abc "
    assert truncate_at_stop("abc", None) == "abc"


def test_load_from_path_and_identity(tiny):
    model, tok, path = tiny
    g1 = load_generator(str(path), backend="hf", device="cpu", dtype="float32")
    g2 = HFGenerator(model, tok)
    assert g1.generate(PROMPTS[:3], max_new_tokens=8, progress=False) == g2.generate(PROMPTS[:3], max_new_tokens=8,
                                                                                     progress=False)
    assert g1.identity == load_generator(str(path), backend="hf").identity
    assert g1.identity.startswith("sha256:")  # a small model: identified by its bytes
    assert g2.identity.startswith("mem:")


def test_path_identity_follows_the_defining_bytes(tiny, tmp_path, monkeypatch):
    # the generation cache's model identity: a copy or a renamed output is the same model (repair evaluates its
    # output before renaming it into place), a model card is not part of it, new weights are a new model
    import shutil

    import safemerge.evaluate.generate as G

    _, _, path = tiny
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "README.md").write_text("a model card")
    assert G.fingerprint_path(copy) == G.fingerprint_path(path)
    (weights,) = copy.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert G.fingerprint_path(copy) != G.fingerprint_path(path)
    # above the content limit: path, sizes and modification times
    monkeypatch.setattr(G, "CONTENT_IDENTITY_MAX_BYTES", 0)
    big = G.fingerprint_path(path)
    assert str(path.resolve()) in big and big != G.fingerprint_path(copy)


def test_adapter_applied_without_merging(tiny, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from safemerge.testing import make_tiny_model, perturb_model

    model, tok, path = tiny
    base = perturb_model(make_tiny_model("llama", hidden=64), seed=1, scale=0.2)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    gen = load_generator(str(path), adapter=str(tmp_path / "adapter"), backend="hf", device="cpu", dtype="float32")
    assert isinstance(gen.model, PeftModel)  # not merged
    assert any("lora_A" in n for n, _ in gen.model.named_parameters())
    plain_gen = load_generator(str(path), backend="hf", dtype="float32")
    plain = plain_gen.generate(PROMPTS, max_new_tokens=10, progress=False)
    adapted = gen.generate(PROMPTS, max_new_tokens=10, progress=False)
    assert adapted != plain
    merged = HFGenerator(peft_model.merge_and_unload(), tok).generate(PROMPTS, max_new_tokens=10, progress=False)
    assert adapted == merged  # same function as the merged weights
    assert gen.identity != load_generator(str(path), backend="hf").identity


def test_loading_errors(tiny, tmp_path):
    model, tok, path = tiny
    with pytest.raises(SafemergeError, match="model not found"):
        load_generator(str(tmp_path / "missing"), backend="hf")
    with pytest.raises(SafemergeError, match="needs its tokenizer"):
        load_generator(model, backend="hf")
    with pytest.raises(SafemergeError, match="not a PEFT adapter"):
        load_generator(model, tokenizer=tok, adapter=str(tmp_path), backend="hf")
    pkl = tmp_path / "pickled"
    pkl.mkdir()
    (pkl / "config.json").write_text((path / "config.json").read_text())
    (pkl / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(SafemergeError, match="pickle"):
        load_generator(str(pkl), backend="hf")
    with pytest.raises(SafemergeError, match="unknown backend"):
        load_generator(model, tokenizer=tok, backend="tpu")
    with pytest.raises(SafemergeError, match="unknown dtype"):
        load_generator(model, tokenizer=tok, backend="hf", dtype="int3")


def test_backend_resolution(monkeypatch):
    import importlib.util

    import torch

    assert resolve_backend("hf", "x") == "hf"
    assert resolve_backend("auto", object()) == "hf"  # in-memory models always use transformers
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "/some/model") == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "/some/model") == "hf"


def test_default_batch_size(tiny):
    model, tok, _ = tiny
    assert HFGenerator(model, tok).batch_size_for(20, 8) >= 1
