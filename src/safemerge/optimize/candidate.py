"""Scoring merge candidates in memory: merge → copy into one resident model → objective.

Each candidate configuration is merged with :func:`safemerge.engine.merge_in_memory` from
checkpoints opened once (lazy, memory-mapped), the float32 result is copied into the parameters
of a single resident Hugging Face model (no disk round-trip, no model re-instantiation), and the
answer-token objective of :mod:`safemerge.optimize.objective` is computed on the fixed sample.
This is mergekit-evolve's ``InMemoryMergeEvaluator`` design, with a data objective in place of
lm-eval tasks (Hammoud et al. 2024, §4.4).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safemerge.engine import merge_in_memory
from safemerge.errors import CheckpointError, ConfigError
from safemerge.evaluate.generate import resolve_dtype
from safemerge.io.checkpoint import refuse_custom_code, require_finite, split_layer_name
from safemerge.io.hub import resolve_model_ref
from safemerge.io.references import open_checkpoint
from safemerge.optimize.config import DataSection, OptimizeConfig
from safemerge.optimize.genome import Genome
from safemerge.optimize.objective import AnswerCEObjective, sample_records
from safemerge.options import RunOptions, or_default
from safemerge.synth.common import read_records

SAFETY_TYPES = {"safety", "alignment", None}
EXPERT_TYPES = {"domain", "task", "expert", None}


def load_objective_data(data: DataSection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read ``data.safety`` / ``data.expert`` files and draw the fixed samples.

    A file may hold both kinds: records with a ``type`` field are kept only in the matching set
    (``safety``/``alignment`` vs ``domain``/``task``/``expert``). Samples are drawn with seeds
    ``data.seed`` (safety) and ``data.seed + 1`` (expert).
    """

    def read(paths: Sequence[str], types: set[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in paths:
            out.extend(r for r in read_records(p) if r.get("type") in types)
        return out

    safety = read(data.safety, SAFETY_TYPES)
    expert = read(data.expert, EXPERT_TYPES)
    if data.safety and not safety:
        raise ConfigError("data.safety: no safety records found",
                          "give JSONL records {prompt, response} (type: safety)")
    if data.expert and not expert:
        raise ConfigError("data.expert: no domain records found",
                          "give JSONL records {prompt, response} (type: domain)")
    return sample_records(safety, data.n_safety, data.seed), sample_records(expert, data.n_expert, data.seed + 1)


def require_finite_inputs(checkpoint: Any, ref: str) -> None:
    """Refuse a pool model with a NaN/Inf tensor (checked once per search, one tensor at a time)."""

    for name in checkpoint.names() if hasattr(checkpoint, "names") else list(checkpoint):
        require_finite(checkpoint.get(name), name, ref)


def build_genome(cfg: OptimizeConfig, base_ckpt: Any) -> Genome:
    """The genome of ``cfg.genome`` for the architecture of ``base_ckpt`` (layer count and prefix)."""

    prefix, n_layers = "model.layers", 0
    for name in base_ckpt.names() if hasattr(base_ckpt, "names") else list(base_ckpt):
        parts = split_layer_name(name)
        if parts is not None:
            prefix = parts[0]
            n_layers = max(n_layers, parts[1] + 1)
    return Genome(cfg.genome, num_layers=max(1, n_layers), layer_prefix=prefix)


class CandidateEvaluator:
    """Holds the opened checkpoints, one resident model and the objective; scores candidates.

    Args:
        cfg: the optimize configuration.
        options: ``device`` (``cpu`` or ``cuda``: model and merge arithmetic), ``allow_pickle`` (``.bin``/``.pt``
            model checkpoints), ``trust_remote_code`` (the resident model's load); the seed is the config's.
        num_threads: ``torch.set_num_threads`` for this process (``None`` = unchanged).
    """

    def __init__(self, cfg: OptimizeConfig, *, options: RunOptions | None = None,
                 num_threads: int | None = None) -> None:

        if num_threads:
            torch.set_num_threads(int(num_threads))
        options = or_default(options)
        trust_remote_code = options.trust_remote_code
        self.cfg = cfg
        self.device = device = options.device
        self.seed = cfg.seed
        # in-memory merges: the process's threads (the engine's workers; an actor of --ray has its own), no bar
        # (they run once per candidate), the config's seed. The inputs are checked for NaN/Inf once, here, and
        # not again by every candidate's merge (which still checks what it writes).
        self.options = RunOptions(allow_pickle=options.allow_pickle, device=device, seed=cfg.seed,
                                  threads=max(1, torch.get_num_threads()), progress=False, allow_nonfinite=True)
        refs = list(dict.fromkeys([*([cfg.genome.base_model] if cfg.genome.base_model else []), *cfg.genome.models]))
        self.checkpoints = {r: open_checkpoint(r, options=self.options) for r in refs}
        if not options.allow_nonfinite:
            for ref, ck in self.checkpoints.items():
                require_finite_inputs(ck, ref)
        anchor = cfg.genome.base_model or cfg.genome.models[0]
        self.genome = build_genome(cfg, self.checkpoints[anchor])
        # the resident model is loaded from the anchor's model directory (a Hub id resolved to its snapshot);
        # its weights are replaced by every candidate's merge, so an adapter in the reference does not matter here
        model_dir = str(resolve_model_ref(anchor, options=self.options)[0])
        tok_src = cfg.genome.tokenizer_source
        tok_dir = str(resolve_model_ref(tok_src)[0]) if tok_src and tok_src not in ("base", "union") else model_dir
        if not (Path(model_dir) / "config.json").is_file():
            raise CheckpointError(f"{model_dir} has no config.json",
                                  "the base model must be a Hugging Face model directory")
        refuse_custom_code(model_dir, trust_remote_code)
        refuse_custom_code(tok_dir, trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
        # the scoring model's dtype (objective.dtype; "auto" is resolved by run_optimize, or here when the
        # evaluator is built directly): every candidate's float32 merge is rounded into it when loaded
        self.dtype = resolve_dtype(cfg.objective.dtype, device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, self.dtype),
                                                          trust_remote_code=trust_remote_code)
        self.model.to(device).eval()
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        safety, expert = load_objective_data(cfg.data)
        self.n_safety, self.n_expert = len(safety), len(expert)
        o = cfg.objective
        self.objective = AnswerCEObjective(self.tokenizer, safety, expert, alpha=o.alpha, batch_size=o.batch_size,
                                           max_length=o.max_length, safety_tokens=o.safety_tokens)

    # ------------------------------------------------------------------ merging
    def merge(self, config: dict[str, Any]) -> dict[str, Any]:
        """Merge ``config`` in memory (float32 tensors by name), reusing the opened checkpoints."""

        return merge_in_memory(config, options=self.options, checkpoints=self.checkpoints)

    def load_state(self, state: dict[str, Any]) -> None:
        """Copy tensors into the resident model's parameters (tied parameters are written once per alias)."""

        missing = {n for n, p in self.model.named_parameters()}  # deduplicated names
        with torch.no_grad():
            for name, t in state.items():
                p = self._params.get(name)
                if p is None:
                    continue
                if tuple(p.shape) != tuple(t.shape):
                    raise CheckpointError(f"merged tensor {name} has shape {tuple(t.shape)}, the model expects "
                                          f"{tuple(p.shape)}",
                                          "all models of the pool must share the base model's architecture")
                p.copy_(t.to(dtype=p.dtype, device=p.device))
                missing.discard(name)
        missing = {n for n in missing if not (n == "lm_head.weight" and getattr(self.model.config,
                                                                                "tie_word_embeddings", False))}
        if missing:
            raise CheckpointError(f"the merge produced no tensor for {sorted(missing)[0]} ({len(missing)} missing)",
                                  "check that the pool models have the base model's architecture")

    def load_model(self, ref: str) -> None:
        """Copy one pool model's own weights into the resident model (LM-Cocktail scores each model)."""
        ck = self.checkpoints[ref]
        self.load_state({n: ck.get(n) for n in (ck.names() if hasattr(ck, "names") else list(ck)) if n in self._params})

    # ------------------------------------------------------------------ scoring
    def score_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Merge, load and score one configuration: loss parts plus merge/score seconds."""
        t0 = time.perf_counter()
        state = self.merge(config)
        self.load_state(state)
        del state
        t1 = time.perf_counter()
        parts = self.objective(self.model)
        t2 = time.perf_counter()
        return {**parts.as_dict(), "merge_s": round(t1 - t0, 4), "score_s": round(t2 - t1, 4)}

    def score_vector(self, x: Sequence[float]) -> dict[str, Any]:
        """Score the genome vector ``x``."""
        return self.score_config(self.genome.to_config(list(x)))

    def score_model(self, ref: str) -> dict[str, Any]:
        """Score one pool model as it is."""
        t0 = time.perf_counter()
        self.load_model(ref)
        parts = self.objective(self.model)
        return {**parts.as_dict(), "merge_s": 0.0, "score_s": round(time.perf_counter() - t0, 4)}


class SerialBackend:
    """Evaluates candidates one after another in this process."""

    def __init__(self, evaluator: CandidateEvaluator) -> None:
        self.evaluator = evaluator

    def score_vectors(self, xs: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
        return [self.evaluator.score_vector(x) for x in xs]

    def score_models(self, refs: Sequence[str]) -> list[dict[str, Any]]:
        return [self.evaluator.score_model(r) for r in refs]

    def close(self) -> None:
        pass
