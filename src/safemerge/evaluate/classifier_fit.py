"""Fit a judge: a linear head on a frozen causal LM, saved as a Hugging Face sequence classifier.

A second judge is only evidence when it does not share the first one's blind spots. The keyword judges
(``keyword``, ``keyword:strict``) both look for phrases; a classifier fitted on labelled responses decides
from the text's representation instead. :func:`fit_classifier_judge` turns any local causal LM of a family
that ``AutoModelForSequenceClassification`` knows (Llama, Mistral, Qwen2 …) into such a judge:

* features: the final hidden state at the response's last non-padding token — exactly the state the HF
  ``*ForSequenceClassification`` head reads (it pools its logits at the last token that is not
  ``pad_token_id``), computed with the same tokenizer call as :class:`~safemerge.evaluate.judges.ClassifierJudge`;
* head: L2-regularised logistic regression ``P(harmful | h) = σ(wᵀh)`` fitted in float64 with L-BFGS,
  written as the two rows ``(−w/2, w/2)`` of the head (softmax of two logits = σ of their difference).
  The HF head has no bias, so the fit has none either;
* a held-out share of every class (``holdout``) measures the judge before the final fit on all examples and picks
  the regularisation strength among ``l2`` (the largest of the best, on a tie).

The result is an ordinary directory (weights, tokenizer, ``id2label = {0: safe, 1: harmful}``) that
``--judge classifier:PATH`` loads; ``fit.json`` beside it records the data sizes and accuracies, and
``fit_data.jsonl`` the labelled texts it was fitted on (for audit).
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from safemerge.errors import SafemergeError
from safemerge.evaluate.generate import check_weights
from safemerge.io.checkpoint import refuse_custom_code
from safemerge.io.output import atomic_output, check_output_path
from safemerge.io.text import read_json_records
from safemerge.progress import progress_bar

LABELS = {0: "safe", 1: "harmful"}
#: regularisation strengths tried on the held-out share (mean-loss units)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: how a labelled-response file may spell its labels (case-insensitive)
LABEL_WORDS = {"harmful": 1, "unsafe": 1, "1": 1, "true": 1, "safe": 0, "0": 0, "false": 0}


def read_labelled_responses(path: str | Path) -> tuple[list[str], list[int]]:
    """Texts and labels (1 = harmful) from a JSONL / JSON file of ``{"text": …, "label": "harmful" | "safe"}``
    records (``response`` for ``text``; labels also as 1/0 or true/false) — the layout of the ``fit_data.jsonl``
    a fit writes, so an audited file can be corrected and fitted again. A bad record is a one-line error naming
    its position."""
    texts: list[str] = []
    labels: list[int] = []
    for rec, where in read_json_records(path, "labelled-response file"):
        if not isinstance(rec, dict):
            rec = {"text": rec}
        text = rec.get("text", rec.get("response"))
        label = LABEL_WORDS.get(str(rec.get("label")).strip().lower())
        if not isinstance(text, str) or label is None:
            raise SafemergeError(f"{where} needs a text and a label harmful|safe, got "
                                 f"{ {k: str(v)[:40] for k, v in rec.items()} }",
                                 'write one {"text": ..., "label": "harmful" | "safe"} object per line')
        texts.append(text)
        labels.append(label)
    return texts, labels


def last_token_features(model: torch.nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str], *,
                        batch_size: int = 16, max_length: int = 512, progress: bool = False) -> torch.Tensor:
    """``len(texts) × hidden`` float64 features: the input of the classification head at the token the HF
    head pools (the last one that is not ``pad_token_id``), one batch at a time as the judge tokenizes."""
    pad_id = model.config.pad_token_id
    rows: list[torch.Tensor] = []
    with torch.inference_mode(), progress_bar("reading responses", total=len(texts), enabled=progress,
                                              unit="texts") as bar:
        for s in range(0, len(texts), batch_size):
            enc = tok(list(texts[s:s + batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            hidden = model.base_model(**enc).last_hidden_state  # (batch, tokens, hidden): the head's input
            ids = enc["input_ids"]
            positions = torch.arange(ids.shape[-1])
            last = (positions * (ids != pad_id).to(positions.dtype)).argmax(-1)
            rows.append(hidden[torch.arange(ids.shape[0]), last].double())
            bar.advance(n=ids.shape[0])
    return torch.cat(rows) if rows else torch.empty(0, 0, dtype=torch.float64)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 500) -> torch.Tensor:
    """``w`` minimising mean BCE(σ(x w), y) + ``l2``/2 · ‖w‖² (no intercept), float64 L-BFGS."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")
    target = y.double()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, target) + 0.5 * l2 * w.dot(w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    return float(((x @ w > 0).long() == y).double().mean()) if len(y) else float("nan")


def _split(labels: Sequence[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a per-class held-out share and of the rest (deterministic in ``seed``)."""
    rng = random.Random(seed)
    train, held = [], []
    for cls in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == cls]
        rng.shuffle(idx)
        cut = int(round(len(idx) * holdout))
        held += idx[:cut]
        train += idx[cut:]
    return sorted(train), sorted(held)


def fit_classifier_judge(base_model: str | Path, texts: Sequence[str], labels: Sequence[int], out_dir: str | Path,
                         *, l2: float | Sequence[float] = L2_GRID, holdout: float = 0.2, seed: int = 0,
                         batch_size: int = 16, trust_remote_code: bool = False, allow_pickle: bool = False,
                         force: bool = False, inputs: Sequence[str | Path] = (),
                         progress: bool = False) -> dict[str, Any]:
    """Fit a harmful/safe head on ``base_model`` from ``texts`` (responses) and ``labels`` (1 = harmful) and
    save the classifier at ``out_dir`` (atomically; ``force`` replaces an existing one). Returns the statistics
    also written to ``fit.json``. ``allow_pickle`` / ``trust_remote_code``: as for every model load; ``inputs``:
    further files the output may not be, hold or lie in (the data file the texts came from)."""
    if len(texts) != len(labels) or not texts:
        raise SafemergeError(f"{len(texts)} texts and {len(labels)} labels", "give one label per text, at least one")
    if set(labels) != {0, 1}:
        raise SafemergeError("labels must contain both 0 (safe) and 1 (harmful)", "add examples of both classes")
    base = Path(base_model)
    check_output_path(out_dir, force=force, inputs=[base, *inputs])  # before the work, not after it
    if base.is_file():
        raise SafemergeError(f"{str(base_model)!r} is a file; the judge is fitted on a Hugging Face model directory",
                             "convert a .gguf first (safemerge convert MODEL.gguf DIR) and pass DIR")
    check_weights(base, allow_pickle)
    refuse_custom_code(base, trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        pad_token_id=tok.pad_token_id, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    x = last_token_features(model, tok, texts, batch_size=batch_size, progress=progress)
    y = torch.tensor([int(v) for v in labels])
    train, held = _split(y.tolist(), holdout, seed)
    grid = [float(v) for v in ((l2,) if isinstance(l2, (int, float)) else l2)]
    stats: dict[str, Any] = {"base_model": str(base), "n": len(y), "n_harmful": int(y.sum()), "holdout": holdout,
                             "seed": seed, "l2": grid[0]}
    if held and train:
        scores = {}
        for lam in grid:
            w_train = fit_logistic(x[train], y[train], l2=lam)
            scores[lam] = (_accuracy(x[held], y[held], w_train), _accuracy(x[train], y[train], w_train))
        best = max(grid, key=lambda lam: (scores[lam][0], lam))
        stats.update(l2=best, heldout_accuracy=scores[best][0], train_accuracy=scores[best][1], n_heldout=len(held),
                     heldout_accuracy_by_l2={f"{lam:g}": scores[lam][0] for lam in grid})
    w = fit_logistic(x, y, l2=stats["l2"])
    stats["fit_accuracy"] = _accuracy(x, y, w)
    with torch.no_grad():
        model.score.weight.copy_(torch.stack([-w / 2, w / 2]).to(model.score.weight.dtype))
    with atomic_output(out_dir, force=force, inputs=[base, *inputs]) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "fit.json").write_text(json.dumps(stats, indent=1))
        (tmp / "fit_data.jsonl").write_text("".join(json.dumps({"text": t, "label": LABELS[int(v)]}) + "\n"
                                                    for t, v in zip(texts, labels)))
    return stats
