"""Chat-formatted SFT examples: prompt masked, response + end-of-turn labelled, right-padded batches."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from safemerge.errors import SafemergeError
from safemerge.testing import build_tokenizer
from safemerge.train.tokenize import IGNORE_INDEX, collate, encode_chat_example

WORDS = ["system", "user", "assistant", "hello", "there", "hi", "how", "are", "you", "fine", "be", "nice"]


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tokenizer(128, words=WORDS)


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from safemerge.io.gguf import find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except SafemergeError as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _labelled(ex):
    return [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]


def test_tiny_prompt_masked_response_labelled(tiny_tok):
    ex = encode_chat_example(tiny_tok, "how are you", "fine , you ?", system="be nice")
    assert ex["boundary"] == "tokens"
    assert len(ex["input_ids"]) == len(ex["labels"])
    toks = tiny_tok.convert_ids_to_tokens(ex["input_ids"])
    # the prompt rendered with the generation header is exactly the masked part
    prompt_text = tiny_tok.apply_chat_template(
        [{"role": "system", "content": "be nice"}, {"role": "user", "content": "how are you"}],
        tokenize=False, add_generation_prompt=True,
    )
    n_prompt = len(tiny_tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert all(l != IGNORE_INDEX for l in ex["labels"][n_prompt:])
    assert tiny_tok.convert_ids_to_tokens(_labelled(ex)) == ["fine", ",", "you", "?", "<|im_end|>"]
    assert toks[n_prompt - 2 : n_prompt] == ["<|im_start|>", "assistant"]  # the generation header is masked
    # labels are the token ids themselves (the model shifts them)
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


def test_tiny_without_system(tiny_tok):
    ex = encode_chat_example(tiny_tok, "hello", "hi")
    toks = tiny_tok.convert_ids_to_tokens(ex["input_ids"])
    assert "system" not in toks
    assert tiny_tok.convert_ids_to_tokens(_labelled(ex)) == ["hi", "<|im_end|>"]


def test_truncation_keeps_generation_header_and_some_response(tiny_tok):
    long_prompt = " ".join(["hello"] * 100)
    ex = encode_chat_example(tiny_tok, long_prompt, "fine " * 20, max_length=32)
    assert len(ex["input_ids"]) == 32
    toks = tiny_tok.convert_ids_to_tokens(ex["input_ids"])
    n_masked = sum(l == IGNORE_INDEX for l in ex["labels"])
    assert toks[n_masked - 2 : n_masked] == ["<|im_start|>", "assistant"]
    assert 8 <= len(_labelled(ex)) <= 24


def test_no_chat_template_is_a_user_error(tiny_tok):
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    with pytest.raises(SafemergeError, match="chat template"):
        encode_chat_example(tok, "hello", "hi")


def test_collate_right_pads(tiny_tok):
    a = encode_chat_example(tiny_tok, "hello there", "hi there , how are you ?")
    b = encode_chat_example(tiny_tok, "hi", "fine")
    batch = collate([a, b], tiny_tok.pad_token_id)
    n = len(a["input_ids"])
    m = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, n) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1, :m].tolist() == b["input_ids"]
    assert (batch["input_ids"][1, m:] == tiny_tok.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * m + [0] * (n - m)
    assert batch["labels"][1].tolist() == b["labels"] + [IGNORE_INDEX] * (n - m)
    assert batch["labels"][0].tolist() == a["labels"]
    with pytest.raises(SafemergeError):
        collate([], 0)


def test_smollm2_chatml(smol_tok):
    ex = encode_chat_example(smol_tok, "Hello!", "Hi there. How can I help?")
    assert ex["boundary"] == "tokens"
    text = smol_tok.decode(_labelled(ex))
    assert text == "Hi there. How can I help?<|im_end|>"
    masked = smol_tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l == IGNORE_INDEX])
    # SmolLM2's template inserts its default system prompt; all of it is masked
    assert masked.startswith("<|im_start|>system\n") and masked.endswith("<|im_start|>assistant\n")
    assert "Hello!" in masked
    ex2 = encode_chat_example(smol_tok, "Hello!", "Hi.", system="You are terse.")
    assert "You are terse." in smol_tok.decode(ex2["input_ids"])
    assert smol_tok.decode(_labelled(ex2)) == "Hi.<|im_end|>"


def test_text_fallback_when_token_prefix_breaks(tiny_tok):
    """A template whose response merges with the header at token level falls back to the text boundary."""
    import copy

    tok = copy.deepcopy(tiny_tok)
    # the header "assistant:" is glued to the answer, so "assistant:hi" is one (unknown) word token
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    ex = encode_chat_example(tok, "hello", "hi")
    assert ex["boundary"] == "text"
    assert tok.convert_ids_to_tokens(_labelled(ex)) == ["hi", "<|im_end|>"]
