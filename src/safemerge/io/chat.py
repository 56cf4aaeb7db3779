"""Rendering a tokenizer's chat template, with template failures reported as user errors.

A chat template is Jinja code shipped in the model directory. transformers runs it in Jinja's
sandbox, so it cannot reach Python objects; a template that tries (``SecurityError``), calls
``raise_exception()`` or is malformed raises a ``jinja2`` ``TemplateError`` — reported here as
one line naming the model's template, not as an internal error.
"""
from __future__ import annotations

from typing import Any

from jinja2.exceptions import TemplateError

from safemerge.errors import SafemergeError


def render_chat_template(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False)`` as one string.

    Raises:
        SafemergeError: the template raised (``raise_exception``), broke the sandbox's rules or
            does not parse.
    """

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise SafemergeError(
            f"the chat template of {name} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
            "fix chat_template in tokenizer_config.json (or chat_template.jinja), "
            "or set chat_template in the merge config",
        ) from None
    if not isinstance(text, str):  # some tokenizers return a list for batched input
        text = text[0]
    return text
