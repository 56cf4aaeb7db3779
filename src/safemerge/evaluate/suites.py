"""Several suites of one model in one call, each with its own generation budget, without loading it when cached.

The workflows above the harness — automatic τ/α (:mod:`safemerge.tuning`), ``safemerge repair``, the demo and
the safety LoRA's own evaluation — measure a model on a harmful, a benign look-alike and a utility suite at
once; :func:`evaluate_suites` runs :func:`safemerge.evaluate.api.evaluate` per suite through one
:class:`LazyGenerator`, which loads the model only if some generation is not cached.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemerge.evaluate.api import GenerationSettings, evaluate
from safemerge.evaluate.generate import Generator, generation_dtype, load_generator, model_identity
from safemerge.evaluate.records import SUITES, PromptSets
from safemerge.io.output import atomic_write_text
from safemerge.options import RunOptions

# Evaluation defaults of the workflows: the CPU-aware dtype decision (bf16 where native: ~3x faster than float32
# batch 16, same keyword-judge decisions on >= 95% of prompts) and a batch sized from memory; bf16 generations are
# cached under their own identity.
EVAL_DTYPE: str | None = None
EVAL_BATCH: int | None = None


@dataclass(frozen=True)
class SuiteSettings:
    """How the suites are generated and judged: the judge, per-suite token budgets, batch size and dtype."""

    judge: str = "keyword"
    max_new_tokens: Mapping[str, int] | None = None  # per suite, e.g. {"harmful": 32, "utility": 64}
    batch_size: int | None = EVAL_BATCH
    dtype: str | None = EVAL_DTYPE


class LazyGenerator:
    """A generator that loads ``model`` (+ ``adapter``) only when a generation is not cached.

    :func:`safemerge.evaluate.api.evaluate` accepts a ready generator; this one has the same
    identity as the evaluation harness would compute, so cached generations are found without
    loading the model at all.
    """

    backend = "hf"

    def __init__(self, model: str | Path, adapter: str | Path | None = None, dtype: str | None = EVAL_DTYPE) -> None:
        self.model_path, self.adapter = str(model), (str(adapter) if adapter else None)
        self.dtype = generation_dtype(self.model_path, dtype)  # the evaluation default: bf16 where native
        identity = model_identity(self.model_path, self.adapter)
        self.identity = identity if self.dtype == "float32" else f"{identity}:{self.dtype}"
        self._gen: Generator | None = None

    def _load(self) -> Generator:
        if self._gen is None:
            self._gen = load_generator(self.model_path, adapter=self.adapter, backend="hf", dtype=self.dtype)
        return self._gen

    def generate(self, prompts: list[Any], **kw: Any) -> list[str]:
        return self._load().generate(prompts, **kw)

    def complete(self, texts: list[str], **kw: Any) -> list[str]:
        return self._load().complete(texts, **kw)


def evaluate_suites(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    suites: Mapping[str, Any],
    max_new_tokens: Mapping[str, int] | None = None,
    out_dir: str | Path,
    judge: str = "keyword",
    batch_size: int | None = EVAL_BATCH,
    progress: bool = False,
    dtype: str | None = EVAL_DTYPE,
    limits: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (+ ``adapter``) on several suites, each with its own generation budget.

    Each suite is evaluated by :func:`safemerge.evaluate.api.evaluate` into ``out_dir/<suite>/``
    (its generation cache lives there), on the first ``limits[suite]`` items when given; the combined
    ``results.json`` (same schema as ``safemerge eval``) is written to ``out_dir`` and returned.
    """
    options = RunOptions(progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = LazyGenerator(model, adapter, dtype)
    combined: dict[str, Any] = {"model": str(model), "adapter": str(adapter) if adapter else None,
                                "model_identity": gen.identity,
                                "settings": {"max_new_tokens": {}, "sets": {}, "dtype": dtype}}
    for name in SUITES:
        spec = suites.get(name)
        if spec is None:
            continue
        mnt = (max_new_tokens or {}).get(name)
        res = evaluate(str(model), PromptSets(**{name: spec}), adapter=str(adapter) if adapter else None,
                       judge=judge, generation=GenerationSettings(batch_size=batch_size, max_new_tokens=mnt),
                       out_dir=out / name, generator=gen, options=options, limit=(limits or {}).get(name))
        combined[name] = res[name]
        combined["settings"]["max_new_tokens"][name] = res["settings"]["max_new_tokens"][name]
        combined["settings"]["sets"][name] = res["settings"]["sets"][name]
        combined["settings"]["backend"] = res["settings"]["backend"]
        combined["settings"]["dtype"] = res["settings"]["dtype"]
    atomic_write_text(out / "results.json", json.dumps(combined, indent=2, ensure_ascii=False) + "\n")
    return combined
