"""Helpers to build tiny, real-architecture models offline (tests, benchmarks, ``demo --fast``)."""
from safemerge.testing.tiny import (  # noqa: F401
    CHAT_TEMPLATE,
    build_tokenizer,
    make_tiny_model,
    perturb_model,
    save_model,
)
