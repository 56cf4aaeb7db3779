"""Tiny Llama / Mistral / Qwen2 / Gemma / Phi-3 models with an offline tokenizer.

Models are real ``transformers`` architectures (2 layers, hidden 32–64, grouped-query attention)
so every code path that touches tensor names, biases and tied embeddings is exercised. Variants
("aligned", "fine-tuned", "expert") are made by adding known, seeded perturbations, so merges
have analytic answers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_size: int = 128, words: list[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` built offline with the ``tokenizers`` library.

    The vocabulary is the special tokens, ``words`` (if given), lower-case letters, digits and
    punctuation, padded with ``tok_i`` entries up to ``vocab_size``. A ChatML chat template is set.
    """

    vocab: dict[str, int] = {}
    for tok in _SPECIAL + list(words or []) + list("abcdefghijklmnopqrstuvwxyz0123456789.,?!:;'\"-+*/=()\n"):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"tok{i}", len(vocab))
        i += 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(pattern="\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def _config(arch: str, vocab_size: int, hidden: int, layers: int, tie: bool | None) -> Any:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 8,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=5,
        pad_token_id=3,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=bool(tie) if tie is not None else False)
    if arch == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=bool(tie) if tie is not None else False,
                                sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=hidden // 4, tie_word_embeddings=True if tie is None else tie)
    if arch == "phi3":
        common.pop("bos_token_id")
        return tf.Phi3Config(**common, tie_word_embeddings=bool(tie) if tie is not None else False)
    raise ValueError(f"unknown tiny architecture {arch!r}")


def make_tiny_model(arch: str = "llama", *, seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2,
                    tie: bool | None = None):
    """A randomly initialised tiny causal LM of the given family (``llama``, ``mistral``, ``qwen2``, ``gemma``,
    ``phi3``)."""

    torch.manual_seed(seed)
    cfg = _config(arch, vocab_size, hidden, layers, tie)
    model = tf.AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    with torch.no_grad():
        for p in model.parameters():  # larger-than-default init so differences are visible in fp32
            p.normal_(0.0, 0.05, generator=None)
    model.eval()
    return model


def perturb_model(model, *, seed: int, scale: float = 0.01, only: str | None = None):
    """Add seeded Gaussian noise ``scale·N(0,1)`` to every parameter (or those whose name contains ``only``)."""

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def save_model(model, path: str | Path, *, tokenizer=None, max_shard_size: str | None = None) -> Path:
    """``save_pretrained`` as safetensors (+ tokenizer with chat template); returns the path."""
    path = Path(path)
    kw: dict[str, Any] = {}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kw)
    tok = tokenizer or build_tokenizer(model.config.vocab_size)
    tok.save_pretrained(path)
    return path
