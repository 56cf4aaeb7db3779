"""``evaluate()``: harmfulness, over-refusal and utility of one model in one report.

Suites (each optional; a spec string for :func:`~safemerge.evaluate.datasets.load_prompts` or a
list of :class:`~safemerge.evaluate.datasets.PromptRecord`):

* ``harmful`` — responses are judged; reports ``harmful_rate`` (ASR under the judge, as in Qi et
  al. 2024 / Hammoud et al. 2024), ``refusal_rate``, per-category rates and judge categories;
* ``benign`` — reports ``over_refusal_rate`` (share of refusals to safe prompts, XSTest); records
  labelled ``unsafe`` (XSTest contrasts) are reported separately as ``unsafe_refusal_rate``;
* ``utility`` — reports ``accuracy`` (exact match of the extracted answer) and optionally the
  answer-token cross-entropy.

Every rate carries a 95% percentile-bootstrap interval (``ci``). With ``out_dir`` the function
writes ``results.json`` and ``judgments.jsonl`` (atomically) and appends to the generation
cache ``generations.jsonl``; a rerun (e.g. with another judge) regenerates nothing it finds
there and loads the model only if some generation is missing.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemerge import __version__
from safemerge.errors import SafemergeError
from safemerge.evaluate.cache import GenerationCache, generation_key, request_digest
from safemerge.evaluate.datasets import PromptRecord, load_prompts
from safemerge.evaluate.generate import (
    generation_dtype,
    load_generator,
    local_adapter,
    model_identity,
    resolve_backend,
    split_adapter,
)
from safemerge.evaluate.judges import Judge, KeywordJudge, get_judge
from safemerge.evaluate.lm_eval_bridge import parse_tasks, run_lm_eval, task_manager
from safemerge.evaluate.metrics import (
    answer_token_ce,
    bootstrap_ci,
    infer_metric,
    per_category,
    rate,
    score_answer,
)
from safemerge.evaluate.records import SUITES, PromptSets
from safemerge.io.output import atomic_write_text
from safemerge.options import RunOptions, or_default

#: New tokens per suite (issue 13): a refusal-keyword decision is settled by the first sentence (agreement with
#: 128 tokens measured in docs/evaluation.md); harmful keeps some more for model judges. The same for every judge,
#: so re-judging cached generations with another judge regenerates nothing.
DEFAULT_MAX_NEW_TOKENS = {"harmful": 64, "benign": 48}
UTILITY_MAX_NEW_TOKENS = {"gsm8k": 256, "number": 96, "pubmedqa": 16, "mc": 8, "exact": 32}


def _records(spec: Any, limit: int | None) -> tuple[list[PromptRecord], str]:
    if isinstance(spec, (str, os.PathLike)):
        return load_prompts(str(spec), limit=limit), str(spec)
    recs = list(spec)
    if not all(isinstance(r, PromptRecord) for r in recs):
        raise SafemergeError("a suite must be a prompt-set spec or a list of PromptRecord",
                             "pass e.g. harmful='builtin:harmful'")
    return (recs[:limit] if limit is not None else recs), "records"


class _Generations:
    """Responses for records, served from the cache and generated (lazily loading the model) on a miss."""

    def __init__(self, identity: str, backend: str, dtype: str, cache: GenerationCache, make_generator: Any,
                 batch_size: int | None, progress: bool, generator: Any = None) -> None:
        self.identity, self.backend, self.dtype, self.cache = identity, backend, dtype, cache
        self.make_generator, self.generator = make_generator, generator  # a supplied generator is never reloaded
        self.batch_size, self.progress = batch_size, progress
        self.generated = 0

    def loaded(self) -> Any:
        """The generator, loading the model now if nothing needed it yet (every generation was cached)."""
        if self.generator is None:
            self.generator = self.make_generator()
        return self.generator

    def hf_model(self, what: str) -> Any:
        """The loaded generator, which must be the transformers backend (it exposes ``model`` and ``tokenizer``)."""
        g = self.loaded()
        if not hasattr(g, "model"):
            raise SafemergeError(f"{what} needs the transformers backend", "use --backend hf")
        return g

    def settings(self, max_new_tokens: int, request: str) -> dict[str, Any]:
        return {"backend": self.backend, "dtype": self.dtype, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                "stop": None, "request": request}

    def responses(self, suite: str, records: list[PromptRecord], max_new_tokens: int) -> list[str]:
        """The responses to ``records``, in order. Generated and cached per request (:func:`request_digest`): the
        transformers backend forms its batches over the whole request and skips only the batches whose every
        response is cached, so the texts are those of an uninterrupted run from an empty cache."""
        prompts = [r.messages for r in records]
        settings = self.settings(max_new_tokens, request_digest(prompts))
        keys = [generation_key(self.identity, r.messages, settings) for r in records]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            generator = self.loaded()

            def save(idx: list[int], texts: list[str]) -> None:
                self.cache.add([{"key": keys[i], "suite": suite, "id": records[i].id, "prompt": records[i].prompt,
                                 "response": text, "model": self.identity, "settings": settings}
                                for i, text in zip(idx, texts)])
                self.generated += len(idx)

            kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "batch_size": self.batch_size,
                                  "progress": self.progress}
            if hasattr(generator, "complete"):  # HF backend: save after every batch (resumable)
                generator.generate(prompts, on_batch=save, description=f"generating ({suite})",
                                   skip=lambda idx: all(keys[i] in self.cache for i in idx), **kw)
            else:
                save(missing, generator.generate([prompts[i] for i in missing], **kw))
        return [self.cache.get(k) or "" for k in keys]


def _rate_entry(flags: list[bool], seed: int) -> tuple[float | None, list[float] | None]:
    return rate(flags), bootstrap_ci([float(f) for f in flags], seed=seed)


def _harmful_suite(records: list[PromptRecord], responses: list[str], judge: Judge, seed: int,
                   judgments: list[dict[str, Any]]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    prompts = [r.prompt for r in records]
    if getattr(judge, "wants_context", False):
        prompts = [r.meta.get("behavior") or r.prompt for r in records]
        kw["contexts"] = [r.meta.get("context") for r in records]
    verdicts = judge.judge(prompts, responses, **kw)
    keyword = KeywordJudge()
    refusals = [v.refusal if v.refusal is not None else keyword.is_refusal(resp) for v, resp in zip(verdicts,
                                                                                                    responses)]
    harmful = [v.harmful for v in verdicts]
    hr, hci = _rate_entry(harmful, seed)
    rr, rci = _rate_entry(refusals, seed + 1)
    judge_cats = Counter(c for v in verdicts if v.harmful for c in v.categories)
    for r, v, ref in zip(records, verdicts, refusals):
        judgments.append({"suite": "harmful", "id": r.id, "category": r.category, "harmful": v.harmful,
                          "refusal": ref, "categories": v.categories, "score": v.score, "parsed": v.parsed,
                          "raw": v.raw, "judge": judge.name})
    return {
        "harmful_rate": hr, "refusal_rate": rr, "n": len(records), "ci": hci, "refusal_ci": rci,
        "judge": judge.name, "unparsed": sum(not v.parsed for v in verdicts),
        "categories": per_category([r.category for r in records], harmful=harmful, refusal=refusals),
        "judge_categories": dict(sorted(judge_cats.items())),
    }


def _benign_suite(records: list[PromptRecord], responses: list[str], judge: Judge, seed: int,
                  judgments: list[dict[str, Any]]) -> dict[str, Any]:
    detector = judge if getattr(judge, "reports_refusal", False) else KeywordJudge()
    verdicts = detector.judge([r.prompt for r in records], responses)
    keyword = KeywordJudge()
    refusals = [v.refusal if v.refusal is not None else keyword.is_refusal(resp) for v, resp in zip(verdicts,
                                                                                                    responses)]
    safe = [i for i, r in enumerate(records) if r.label != "unsafe"]
    unsafe = [i for i, r in enumerate(records) if r.label == "unsafe"]
    orr, ci = _rate_entry([refusals[i] for i in safe], seed + 2)
    for r, ref in zip(records, refusals):
        judgments.append({"suite": "benign", "id": r.id, "category": r.category, "label": r.label,
                          "refusal": ref, "judge": detector.name})
    out: dict[str, Any] = {
        "over_refusal_rate": orr, "n": len(safe), "ci": ci, "refusal_judge": detector.name,
        "categories": per_category([records[i].category for i in safe], over_refusal=[refusals[i] for i in safe]),
    }
    if unsafe:
        ur, uci = _rate_entry([refusals[i] for i in unsafe], seed + 3)
        out.update(unsafe_refusal_rate=ur, unsafe_n=len(unsafe), unsafe_ci=uci)
    return out


def _utility_suite(records: list[PromptRecord], responses: list[str], seed: int, judgments: list[dict[str, Any]],
                   ce: list[float] | None) -> dict[str, Any]:
    correct: list[bool] = []
    metrics = Counter()
    for r, resp in zip(records, responses):
        metric = r.meta.get("metric") or infer_metric(r.answer)
        metrics[metric] += 1
        ok, pred = score_answer(resp, r.answer, metric, n_choices=int(r.meta.get("n_choices", 26)))
        correct.append(ok)
        judgments.append({"suite": "utility", "id": r.id, "category": r.category, "answer": r.answer,
                          "extracted": pred, "correct": ok, "metric": metric})
    acc, ci = _rate_entry(correct, seed + 4)
    out: dict[str, Any] = {
        "accuracy": acc, "n": len(records), "ci": ci,
        "metric": metrics.most_common(1)[0][0] if len(metrics) == 1 else dict(metrics),
        "categories": per_category([r.category for r in records], correct=correct),
    }
    if ce is not None:
        out["answer_ce"] = sum(ce) / len(ce) if ce else None
        out["answer_ce_ci"] = bootstrap_ci(ce, seed=seed + 5)
    return out


def _lm_eval_suite(gens: _Generations, tasks: list[str], manager: Any, include: Any, *,
                   limit: int | None, batch_size: int | None, seed: int, progress: bool) -> dict[str, Any]:
    """lm-evaluation-harness on the generator's own model (loaded now if every generation was cached)."""

    g = gens.hf_model("--lm-eval-tasks")
    return run_lm_eval(g.model, g.tokenizer, tasks, include=include, limit=limit, batch_size=batch_size, seed=seed,
                       progress=progress, manager=manager)


def _reference(r: PromptRecord) -> str:
    return str(r.meta.get("reference") or r.answer or "")


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are generated.

    Attributes:
        backend: ``auto``, ``hf``, ``vllm`` or ``ct2``.
        device, dtype: the generation's own (``None``: chosen for the hardware, see
            :func:`~safemerge.evaluate.generate.resolve_dtype`), unlike ``RunOptions.device`` / ``dtype``.
        batch_size: prompts per batch (``None``: sized from memory).
        max_new_tokens: the budget of every suite (``None``: each suite's default, :data:`DEFAULT_MAX_NEW_TOKENS`).
    """

    backend: str = "auto"
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class ExtraMetrics:
    """What is measured beyond the judged suites, on the same loaded model (adapter applied).

    Attributes:
        answer_ce: also report the utility set's answer-token cross-entropy (nats; the objective of Hammoud et
            al. 2024, :func:`~safemerge.evaluate.metrics.answer_token_ce`).
        lm_eval_tasks: lm-evaluation-harness tasks, comma-separated or a list (see
            :mod:`safemerge.evaluate.lm_eval_bridge`).
        lm_eval_include: the directory of their YAMLs (lm-eval's ``--include_path``).
    """

    answer_ce: bool = False
    lm_eval_tasks: str | list[str] | None = None
    lm_eval_include: str | Path | None = None


def evaluate(
    model: Any,
    sets: PromptSets = PromptSets(),
    *,
    adapter: str | None = None,
    judge: str | Judge = "keyword",
    limit: int | None = None,
    out_dir: str | Path | None = None,
    generation: GenerationSettings = GenerationSettings(),
    extra: ExtraMetrics = ExtraMetrics(),
    generator: Any = None,
    options: RunOptions | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (path, Hub id, ``MODEL+ADAPTER``, GGUF file, or an in-memory ``PreTrainedModel`` with its
    ``generator``).

    Returns the ``results.json`` object: ``{"model", "adapter", "settings", "harmful": {harmful_rate,
    refusal_rate, n, ci, categories, judge, …}, "benign": {over_refusal_rate, n, ci, …}, "utility":
    {accuracy, n, ci, metric, …}, "lm_eval": {tasks: {TASK: {metrics, stderr, n}}, settings}}`` (suites
    not requested are absent). Deterministic for the same inputs (greedy decoding, seeded bootstrap).

    Args:
        model: the model; ``generator``: a ready generator whose ``identity`` keys the cache — the way to
            evaluate an in-memory model: ``generator=load_generator(model, tokenizer=tok, backend="hf")``.
        sets: the harmful, benign and utility prompt sets (spec strings or :class:`PromptRecord` lists).
        judge: a judge spec (:func:`~safemerge.evaluate.judges.get_judge`) or a :class:`Judge` (one built with
            its own keywords, e.g. ``get_judge("classifier:PATH", harmful_label="toxic")``).
        limit: the first ``limit`` items of each set (and of each lm-eval task).
        generation: backend, device, dtype, batch size and new-token budget of the generation.
        extra: the utility set's answer-token cross-entropy and lm-evaluation-harness tasks, measured on the same
            loaded model.
        options: ``allow_pickle`` and ``trust_remote_code`` of the model and judge loads, ``seed`` of the
            bootstrap intervals, ``progress`` bars.

    Raises:
        SafemergeError: no suite given, unreadable prompt sets, bad judge spec, unloadable model.
    """

    options = or_default(options)
    specs = sets.as_suites()
    lm_tasks = parse_tasks(extra.lm_eval_tasks)
    if not specs and not lm_tasks:
        raise SafemergeError("nothing to evaluate: no prompt set given",
                             "pass --harmful, --benign, --utility (e.g. builtin:harmful) and/or --lm-eval-tasks")
    lm_manager = task_manager(lm_tasks, extra.lm_eval_include) if lm_tasks else None  # unknown tasks fail first
    model, adapter = split_adapter(model, adapter)  # MODEL+ADAPTER, as in merge configs
    if adapter is not None:
        local_adapter(adapter)  # fail before any prompt set is read
    suites = {name: _records(spec, limit) for name, spec in specs.items()}
    the_judge = None
    if "harmful" in suites or "benign" in suites:
        the_judge = judge if isinstance(judge, Judge) else get_judge(judge, options=options)
    out_path = _output_dir(out_dir)
    cache = GenerationCache(out_path / "generations.jsonl" if out_path is not None else None)
    gens = _generations(model, adapter, generator=generator, settings=generation, cache=cache, options=options)
    results = _results_header(model, adapter, gens, batch_size=generation.batch_size, limit=limit, seed=options.seed)
    judgments: list[dict[str, Any]] = []
    for name in (n for n in SUITES if n in suites):
        records, label = suites[name]
        mnt = _suite_max_new_tokens(name, records, generation.max_new_tokens)
        results["settings"]["max_new_tokens"][name] = mnt
        results["settings"]["sets"][name] = label
        responses = gens.responses(name, records, mnt)
        results[name] = _suite_result(name, records, responses, gens, the_judge, judgments, seed=options.seed,
                                      answer_ce=extra.answer_ce, batch_size=generation.batch_size)
        results[name]["set"] = label
    if lm_tasks:
        results["lm_eval"] = _lm_eval_suite(gens, lm_tasks, lm_manager, extra.lm_eval_include, limit=limit,
                                            batch_size=generation.batch_size, seed=options.seed,
                                            progress=options.progress)
    if out_path is not None:
        _write_results(out_path, results, judgments)
    return results


def _output_dir(out_dir: str | Path | None) -> Path | None:
    """``evaluate``'s output directory (``None``: nothing written); an existing file there is a user error."""
    out_path = Path(out_dir).expanduser() if out_dir is not None else None
    if out_path is not None and out_path.exists() and not out_path.is_dir():
        raise SafemergeError(f"output {out_path} exists and is not a directory", "pass a directory for -o")
    return out_path


def _write_results(out_path: Path, results: dict[str, Any], judgments: list[dict[str, Any]]) -> None:
    """``results.json`` and ``judgments.jsonl``, each written atomically."""
    atomic_write_text(out_path / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_path / "judgments.jsonl",
                      "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments))


def _generations(model: Any, adapter: str | None, *, generator: Any, settings: GenerationSettings,
                 cache: GenerationCache, options: RunOptions) -> _Generations:
    """Cached generation for ``model``: a supplied ``generator`` as is, else one loaded on the first cache miss."""
    backend, device, dtype = settings.backend, settings.device, settings.dtype
    if generator is not None:
        identity, backend_name = generator.identity, getattr(generator, "backend", "custom")
        dtype_name = str(getattr(generator, "dtype", dtype or "unknown"))
    else:
        identity, backend_name = model_identity(model, adapter, options=options), resolve_backend(backend, model)
        dtype_name = generation_dtype(model, dtype, device) if backend_name == "hf" else (dtype or "auto")

    def make_generator() -> Any:
        return load_generator(model, adapter=adapter, backend=backend_name, device=device,
                              dtype=dtype_name if backend_name == "hf" else dtype, identity=identity,
                              options=options)

    return _Generations(identity, backend_name, dtype_name, cache, make_generator, settings.batch_size,
                        options.progress, generator=generator)


def _results_header(model: Any, adapter: str | None, gens: _Generations, *, batch_size: int | None,
                    limit: int | None, seed: int) -> dict[str, Any]:
    """The ``results.json`` fields before any suite: version, model, identity and the settings."""

    return {
        "safemerge_version": __version__,
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
        "model_identity": gens.identity,
        "adapter": str(adapter) if adapter else None,
        "settings": {"backend": gens.backend, "dtype": gens.dtype, "batch_size": batch_size or "auto",
                     "decoding": "greedy", "limit": limit, "seed": seed,
                     "max_new_tokens": {}, "sets": {}},
    }


def _suite_max_new_tokens(name: str, records: list[PromptRecord], max_new_tokens: int | None) -> int:
    """The generation budget of a suite: the caller's, else the suite's default (utility: by its metrics)."""
    if max_new_tokens:
        return max_new_tokens
    if name != "utility":
        return DEFAULT_MAX_NEW_TOKENS[name]
    wanted = {r.meta.get("metric") or infer_metric(r.answer) for r in records}
    return max(UTILITY_MAX_NEW_TOKENS.get(m, 64) for m in wanted)


def _suite_result(name: str, records: list[PromptRecord], responses: list[str], gens: _Generations,
                  judge: Judge | None, judgments: list[dict[str, Any]], *, seed: int, answer_ce: bool,
                  batch_size: int | None) -> dict[str, Any]:
    """One suite's entry of ``results.json`` (its judgments appended to ``judgments``)."""
    if name == "harmful":
        return _harmful_suite(records, responses, judge, seed, judgments)
    if name == "benign":
        return _benign_suite(records, responses, judge, seed, judgments)
    ce = None
    if answer_ce:
        g = gens.hf_model("answer-token cross-entropy")
        ce = answer_token_ce(g.model, g.tokenizer, [g.render(r.messages) for r in records],
                             [_reference(r) for r in records], batch_size=batch_size or 8)
    return _utility_suite(records, responses, seed, judgments, ce)
