"""Vocabulary alignment: ``tokenizer_source`` (``union``, ``base``, a model), ``tokenizer.tokens``
and ``tokenizer.pad_to_multiple_of``, with mergekit's semantics.

When a config names a tokenizer source, the output vocabulary is that tokenizer's — for ``union``
the base tokenizer plus every token of the other inputs, appended in input order, then the tokens
named under ``tokenizer.tokens`` that it still lacks. Every vocabulary-indexed tensor (the input
embedding and ``lm_head``) of every input is then re-indexed to the output vocabulary before the
merge method sees it:

* a token the model has keeps the model's row (unless its ``tokens`` entry says ``force: true``);
* a token the model lacks gets a substitute row, the same for every model that lacks it: the
  ``tokens`` entry's source if given (``source: MODEL`` — that model's row of the token;
  ``{kind: model_token, model, token | token_id}`` — a row chosen by its original token or id;
  ``{kind: zero}``); otherwise the only model that has it, else the base's row, else the mean of
  the rows of the models that have it (zero, with a warning, when none has it);
* ``pad_to_multiple_of: k`` rounds the row count up to a multiple of k; the padding rows are the
  mean of the real rows (Hewitt 2021, "Initializing new word embeddings for pretrained language
  models").

Tensors are re-indexed one at a time in the engine (only the embedding and ``lm_head`` jobs), so
memory stays at one tensor per input. ``config.json``'s ``vocab_size`` is patched and the output
tokenizer is saved with the model.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safemerge.config.models import MergeConfig, ModelTokenSource, TokenEmbedding, ZeroSource
from safemerge.errors import CheckpointError, ConfigError
from safemerge.io.hub import resolve_local, split_model_ref

LOG = logging.getLogger("safemerge")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _model_dir(ckpt: Any) -> Path:
    p = Path(ckpt.path)
    return p if p.is_dir() else p.parent


def _tokenizer_dir(ref: str) -> Path:
    """The local directory of a ``tokenizer_source`` that is not among the merged models (a path or Hub id)."""

    return resolve_local(split_model_ref(ref)[0])


def _load_tokenizer(path: Path, what: str) -> Any:
    from transformers import AutoTokenizer  # 0.4-0.7 s: only a merge that aligns vocabularies pays it

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load the tokenizer of {what} ({' '.join(str(exc).split())[:160]})",
                              "the model directory needs its tokenizer files for tokenizer_source") from None


def _vocab_size(ckpt: Any, tokenizer: Any) -> int:
    size = ckpt.config.get("vocab_size")
    return int(size) if isinstance(size, int) else len(tokenizer.get_vocab())


def union_tokenizer(base_tok: Any, tokenizers: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer plus, in input order and by id, every regular token and then every added
    token (settings from the first input that has it) of ``tokenizers`` (``(tokenizer,
    vocab_size)``, base first); ids at or beyond a model's ``vocab_size`` are skipped. The same
    vocabulary as mergekit's union; the ids of the new tokens are deterministic here."""

    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, vocab_size in tokenizers:
        # in id order: mergekit walks a hash map here, so its new ids vary from run to run
        for token, idx in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if idx < vocab_size:
                regular.setdefault(token, None)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < vocab_size:
                added.setdefault(info.content, info)
    out = copy.deepcopy(base_tok)
    base_vocab = base_tok.get_vocab()
    out.add_tokens([t for t in regular if t not in added and t not in base_vocab])
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class VocabAlignment:
    """The output tokenizer and, per input model, the original row of every output token (−1: absent)."""

    tokenizer: Any
    rows: dict[str, torch.Tensor]
    original_vocabs: dict[str, dict[str, int]]
    tokens: Mapping[str, TokenEmbedding]
    base: str | None
    pad_to_multiple_of: int | None

    @property
    def vocab_size(self) -> int:
        """Rows of the aligned tensors: the vocabulary, padded up to ``pad_to_multiple_of``."""
        n = len(self.tokenizer.get_vocab())
        k = self.pad_to_multiple_of
        return n if not k or n % k == 0 else (n // k + 1) * k

    def align(self, models: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Re-index the vocabulary tensors of ``models`` (those of one output tensor, in source
        order) to the output vocabulary (rows first); see the module docstring for the rules."""
        dtype = tensors[models[0]].dtype
        for m in models[1:]:
            dtype = torch.promote_types(dtype, tensors[m].dtype)
        vocab = self.tokenizer.get_vocab()
        n_vocab, shape = len(vocab), tensors[models[0]].shape[1:]
        substitutes = self._substitutes(models, tensors, vocab, dtype)
        forced = [vocab[t] for t, cfg in self.tokens.items() if cfg.force and t in vocab]
        out = {}
        for m in models:
            src = self.rows[m]
            keep = src >= 0
            keep[forced] = False
            new = torch.zeros((self.vocab_size, *shape), dtype=dtype, device=tensors[m].device)
            new[:n_vocab][keep] = tensors[m][src[keep]].to(dtype)
            for row, embedding in substitutes.items():
                if not keep[row]:
                    new[row] = embedding
            if self.vocab_size > n_vocab:
                new[n_vocab:] = torch.mean(new[:n_vocab], dim=0)
            out[m] = new
        return out

    def _substitutes(self, models: Sequence[str], tensors: Mapping[str, torch.Tensor], vocab: Mapping[str, int],
                     dtype: torch.dtype) -> dict[int, torch.Tensor]:
        """Row → substitute row for the tokens some model lacks (or whose entry forces one)."""
        present = torch.stack([self.rows[m] >= 0 for m in models])
        count = present.sum(dim=0)
        out: dict[int, torch.Tensor] = {}
        for token, row in vocab.items():
            cfg = self.tokens.get(token)
            if not (cfg is not None and cfg.force) and int(count[row]) == len(models):
                continue
            if cfg is not None:
                out[row] = self._configured(token, row, cfg, models, tensors).to(dtype)
            elif int(count[row]) == 1:
                donor = models[int(present[:, row].nonzero()[0])]
                out[row] = tensors[donor][self.rows[donor][row]].to(dtype)
            elif int(count[row]) == 0:
                LOG.warning("warning: token %r is in no input model; its embedding is zero", token)
                out[row] = torch.zeros(tensors[models[0]].shape[1:], dtype=dtype)
            elif self.base in models and int(self.rows[self.base][row]) >= 0:
                out[row] = tensors[self.base][self.rows[self.base][row]].to(dtype)
            else:
                mean = torch.zeros(tensors[models[0]].shape[1:], dtype=dtype)
                for i, m in enumerate(models):
                    if present[i, row]:
                        mean = mean + tensors[m][self.rows[m][row]]
                out[row] = mean / int(count[row])
        return out

    def _configured(self, token: str, row: int, cfg: TokenEmbedding, models: Sequence[str],
                    tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        source = cfg.source
        if isinstance(source, ZeroSource):
            return torch.zeros(tensors[models[0]].shape[1:], dtype=tensors[models[0]].dtype)
        model = source.model if isinstance(source, ModelTokenSource) else source
        if model not in tensors:
            raise ConfigError(f"tokenizer.tokens[{token!r}] takes its embedding from {model}, "
                              "which is not an input of this tensor", "name one of the merged models")
        if isinstance(source, ModelTokenSource):
            src_row = source.token_id
            if src_row is None:
                src_row = self.original_vocabs[model].get(source.token or "", -1)
            if not 0 <= src_row < tensors[model].shape[0]:
                what = source.token if source.token is not None else source.token_id
                raise ConfigError(f"tokenizer.tokens[{token!r}]: {what!r} is not a token of {model}",
                                  "use a token (or token_id) of that model's tokenizer")
            return tensors[model][src_row]
        src_row = int(self.rows[model][row])
        if src_row < 0:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: the token is not in {model}'s vocabulary",
                              "use {kind: model_token, model: ..., token: ...} to copy another token's embedding")
        return tensors[model][src_row]


def build_alignment(config: MergeConfig, ckpts: Mapping[str, Any], base: str | None) -> VocabAlignment | None:
    """The vocabulary alignment the config asks for, or ``None`` when it names no tokenizer source."""
    source = config.effective_tokenizer_source
    if source is None:
        return None
    tokens = dict(config.tokenizer.tokens or {}) if config.tokenizer else {}
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
    refs = config.referenced_models()
    substitute_from = base  # a token missing from some model takes the base's row only when base_model is set
    base = base or refs[0]  # the tokenizer that the output vocabulary starts from
    loaded: dict[str, tuple[Any, int]] = {}
    for ref in [base, *[r for r in refs if r != base]]:
        has_tokenizer = any((_model_dir(ckpts[ref]) / f).exists() for f in TOKENIZER_MARKERS)
        if ref != base and not has_tokenizer:
            LOG.warning("warning: %s has no tokenizer; assuming the base model's", ref)
            continue
        tok = _load_tokenizer(_model_dir(ckpts[ref]), ref)
        loaded[ref] = (tok, _vocab_size(ckpts[ref], tok))
    base_tok, base_size = loaded[base]
    if any(idx >= base_size for idx in base_tok.get_vocab().values()) and source in ("union", "base"):
        raise CheckpointError(f"the tokenizer of {base} has token ids beyond its vocab_size {base_size}",
                              "use a tokenizer_source whose tokenizer fits its model, or trim the tokenizer")
    if source == "union":
        out = union_tokenizer(base_tok, list(loaded.values()))
    elif source == "base":
        import copy

        out = copy.deepcopy(base_tok)
    else:
        out = _load_tokenizer(_model_dir(ckpts[source]) if source in ckpts else _tokenizer_dir(source), source)
    missing = [t for t in tokens if t not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    out_vocab = out.get_vocab()
    rows: dict[str, torch.Tensor] = {}
    for ref in refs:
        tok, size = loaded.get(ref, loaded[base])
        size = _vocab_size(ckpts[ref], tok) if ref not in loaded else size
        model_vocab = tok.get_vocab()
        r = torch.full((len(out_vocab),), -1, dtype=torch.long)
        for token, new_id in out_vocab.items():
            old = model_vocab.get(token, -1)
            r[new_id] = old if old < size else -1
        rows[ref] = r
    originals = {ref: tok.get_vocab() for ref, (tok, _) in loaded.items()}
    return VocabAlignment(out, rows, originals, tokens, substitute_from, pad)
