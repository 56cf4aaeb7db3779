"""Chat-formatted supervised examples with the prompt masked out of the loss.

Supervised fine-tuning on ``(prompt, response)`` pairs minimises the cross-entropy of the
response tokens only (the "answer-token" loss used by SafeLoRA, Hsu et al. 2024, §4, and by
SafeMERGE, Djuhera et al. 2025, §4): for an example with tokens ``x_1..x_T`` whose first ``P``
tokens are the prompt,

    L = − Σ_{t=P+1..T} log p(x_t | x_<t)

so every prompt token (system turn, user turn, and the assistant generation header) carries the
label ``-100`` (ignored by ``torch.nn.functional.cross_entropy``), and the response tokens plus the
end-of-turn token are labelled. The end-of-turn token must be learned: it is what makes a
fine-tuned model stop after its answer.

How the boundary is found
-------------------------
The chat template is applied twice — to the prompt alone with ``add_generation_prompt=True``, and
to the full conversation — and the first token sequence must be a prefix of the second. That
"prefix property" holds for ChatML (SmolLM2, Qwen2), Llama-3 and Mistral templates. If a template
breaks it (for example it rewrites earlier turns once an assistant turn exists, or the tokenizer
merges characters across the boundary), we fall back, in order, to:

1. the *text* prefix: when the rendered prompt is a string prefix of the rendered conversation,
   the two parts are tokenised separately and concatenated (the boundary is then exact, at the
   cost of a possibly non-canonical tokenisation at the seam);
2. otherwise the rendered prompt followed by the response text and the EOS token.

Which path was used is reported in the ``"boundary"`` key of the result (``"tokens"``,
``"text"`` or ``"concat"``) so that callers can count fallbacks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from safemerge.errors import SafemergeError

IGNORE_INDEX = -100

# Tokens that close an assistant turn in common chat templates (ChatML, Llama-3, Gemma, Phi-3, Mistral).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>")


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without extra special tokens (the chat template already has them)."""
    enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return [int(i) for i in ids]


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    from safemerge.io.chat import render_chat_template

    return render_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def _messages(tokenizer: Any, prompt: str, system: str | None) -> list[dict[str, str]]:
    """Prompt turns; a system message is folded into the user turn if the template rejects it."""
    if system is None:
        return [{"role": "user", "content": prompt}]
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    try:
        _render(tokenizer, msgs, add_generation_prompt=True)
        return msgs
    except Exception:  # noqa: BLE001 - e.g. Gemma's template raises on a system role
        return [{"role": "user", "content": f"{system}\n\n{prompt}"}]


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Ids of tokens that close an assistant turn for this tokenizer (EOS included)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return ids


def _trim_after_end_of_turn(completion: list[int], eot: set[int], eos_id: int | None) -> list[int]:
    """Keep the completion up to and including its last end-of-turn token.

    Template whitespace after the end-of-turn token (ChatML's trailing newline) is dropped: the
    model should learn to stop, not to emit separators. A template without an end-of-turn token
    gets the EOS token appended.
    """
    for i in range(len(completion) - 1, -1, -1):
        if completion[i] in eot:
            return completion[: i + 1]
    return completion + ([int(eos_id)] if eos_id is not None else [])


def _truncate(prompt_ids: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit ``prompt + completion`` into ``max_length`` tokens.

    The completion keeps at least a quarter of the budget (or all of itself if shorter); the
    prompt is cut from the left so that the generation header right before the answer survives.
    """
    if len(prompt_ids) + len(completion) <= max_length:
        return prompt_ids, completion
    keep_c = min(len(completion), max(max_length - len(prompt_ids), max_length // 4, 1))
    keep_p = max_length - keep_c
    return (prompt_ids[len(prompt_ids) - keep_p:] if keep_p > 0 else []), completion[:keep_c]


def encode_chat_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_length: int = 512,
    system: str | None = None,
) -> dict[str, Any]:
    """Tokenise one ``(prompt, response)`` pair in the tokenizer's chat format, prompt masked.

    Implements the answer-only SFT target (SafeLoRA, Hsu et al. 2024, §4; SafeMERGE, Djuhera et
    al. 2025, Eq. 1 data term): labels are ``-100`` for the system turn, user turn and assistant
    generation header; the response tokens and the end-of-turn token are labelled with their own
    ids (the model shifts them internally).

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        prompt: the user turn.
        response: the assistant turn to learn.
        max_length: maximum number of tokens; longer examples lose prompt tokens from the left
            and, if still too long, response tokens from the right.
        system: optional system message (folded into the user turn if the template has no system role).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "boundary": "tokens"|"text"|"concat"}``.
    """
    if max_length < 2:
        raise SafemergeError(f"max_length must be at least 2, got {max_length}", "pass a larger --max-length")
    if not getattr(tokenizer, "chat_template", None):
        raise SafemergeError(
            "the tokenizer has no chat template",
            "use an instruct model, or set tokenizer.chat_template (e.g. from the base model's tokenizer_config.json)",
        )
    msgs = _messages(tokenizer, str(prompt), system)
    full_msgs = msgs + [{"role": "assistant", "content": str(response)}]
    prompt_text = _render(tokenizer, msgs, add_generation_prompt=True)
    full_text = _render(tokenizer, full_msgs, add_generation_prompt=False)
    prompt_ids = _encode_text(tokenizer, prompt_text)
    full_ids = _encode_text(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        boundary, completion = "tokens", full_ids[len(prompt_ids):]
    elif full_text.startswith(prompt_text) and len(full_text) > len(prompt_text):
        boundary, completion = "text", _encode_text(tokenizer, full_text[len(prompt_text):])
    else:
        boundary, completion = "concat", _encode_text(tokenizer, str(response))
    eos = getattr(tokenizer, "eos_token_id", None)
    completion = _trim_after_end_of_turn(completion, end_of_turn_ids(tokenizer), eos)
    prompt_ids, completion = _truncate(prompt_ids, completion, max_length)
    return {
        "input_ids": prompt_ids + completion,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(completion),
        "boundary": boundary,
    }


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a list of encoded examples into a batch of tensors.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on real tokens)
    and ``labels`` (padded with ``-100`` so padding never contributes to the loss), all
    ``torch.long`` of shape (batch, longest example).
    """
    import torch

    if not examples:
        raise SafemergeError("cannot collate an empty batch", "check that the dataset is not empty")
    if pad_token_id is None:
        raise SafemergeError("the tokenizer has no pad token id", "set tokenizer.pad_token (e.g. to the EOS token)")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        ids, lab = ex["input_ids"], ex["labels"]
        if len(ids) != len(lab):
            raise ValueError(f"example {i}: {len(ids)} input ids but {len(lab)} labels")
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids, dtype=torch.long)
        attention[i, :k] = 1
        labels[i, :k] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def first_answer_tokens(example: dict[str, Any], k: int) -> dict[str, Any]:
    """``example`` with only its first ``k`` labelled (answer) tokens left labelled — the opening of a rejected
    answer, whose later tokens depend on the opening itself (used by the unlikelihood term of ``train_lora``)."""
    labels, seen = [], 0
    for x in example["labels"]:
        keep = x != IGNORE_INDEX and seen < k
        seen += keep
        labels.append(x if keep else IGNORE_INDEX)
    return {**example, "labels": labels}
