"""Planning: turn a :class:`~safemerge.config.MergeConfig` into one job per output tensor.

Everything that can be checked from safetensors headers and the config is checked here,
before a single tensor is read: architectures, layer ranges, tensor presence, shapes,
vocabulary sizes, parameter names, types, ranges and required values.

Semantics follow mergekit 0.1.5:
* ``models:`` becomes one slice whose sources are the listed models over all their layers;
  a ``base_model`` that is not listed is appended as the last source.
* Output layer ``i`` of a slice of ``n`` layers uses gradient position ``t = i/(n−1)``
  (``t = 1`` when ``n = 1``); embeddings and other non-layer tensors use ``t = 0`` and take
  their inputs from the first (embeddings) or last (norm, head) slice.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safemerge.config.models import MergeConfig
from safemerge.config.params import resolve
from safemerge.engine.vocab import build_alignment
from safemerge.errors import CheckpointError, ConfigError
from safemerge.io.checkpoint import split_layer_name
from safemerge.methods.catalog import get_method
from safemerge.methods.registry import MergeMethod

LOG = logging.getLogger("safemerge")


@dataclass
class TensorJob:
    """Everything needed to produce one output tensor.

    Attributes:
        out_name: output tensor name.
        inputs: ``(model_ref, tensor_name)`` for each entry of ``tensors`` passed to the method.
        base: ``(model_ref, tensor_name)`` of the base tensor, or ``None``.
        per_model: per-model parameter lists aligned with ``inputs``.
        params: resolved global parameters.
        shape: output shape.
        out_dtype: storage dtype name.
    """

    out_name: str
    inputs: list[tuple[str, str]]
    base: tuple[str, str] | None
    per_model: dict[str, list[Any]]
    params: dict[str, Any]
    shape: tuple[int, ...]
    out_dtype: str
    passthrough: bool = False
    vocab: Any = None
    """The :class:`~safemerge.engine.vocab.VocabAlignment` re-indexing this tensor's rows (the
    embedding and ``lm_head`` when the config names a tokenizer source), else ``None``."""
    vocab_models: tuple[str, ...] = ()
    """Every source of this tensor, base included, in source order (for the alignment)."""


@dataclass
class MergePlan:
    """The ordered list of tensor jobs plus what the writer needs."""

    config: MergeConfig | None
    """The mergekit config (``None`` for the safety commands' plans, :mod:`.tensorwise`)."""
    method: MergeMethod
    jobs: list[TensorJob]
    reference: str
    num_layers: int
    compute_dtype: str | None
    config_updates: dict[str, Any] = field(default_factory=dict)
    mergekit_arithmetic: bool = False
    """Compute in ``compute_dtype`` in mergekit's operation order (``--mergekit-arithmetic``)
    instead of float32; see :mod:`safemerge.methods.mergekit_order`."""
    vocab: Any = None
    """The output vocabulary (:class:`~safemerge.engine.vocab.VocabAlignment`) when the config
    names a tokenizer source; its tokenizer is saved with the model."""
    tie_break: str = "index"
    """Exact ties at top-k cut-offs: ``index`` or ``mergekit`` (see
    :data:`safemerge.methods.blocks.TIE_BREAKS`); passed to methods that declare ``extra["tie_break"]``."""

    @property
    def total_bytes(self) -> int:
        sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
        return sum(math.prod(j.shape) * sizes.get(j.out_dtype, 4) for j in self.jobs)


@dataclass
class _Source:
    ref: str
    start: int
    end: int
    params: Mapping[str, Any] | None


@dataclass
class _Slice:
    sources: list[_Source]
    base: str | None
    params: Mapping[str, Any] | None


def _layers(ckpt: Any) -> int:
    return int(ckpt.num_layers)


def _normalize(config: MergeConfig, ckpts: Mapping[str, Any]) -> list[_Slice]:
    if config.models is not None:
        srcs = [_Source(m.model, 0, _layers(ckpts[m.model]), m.parameters) for m in config.models]
        if config.base_model and config.base_model not in [m.model for m in config.models]:
            srcs.append(_Source(config.base_model, 0, _layers(ckpts[config.base_model]), None))
        return [_Slice(srcs, config.base_model, None)]
    out = []
    for i, s in enumerate(config.slices or []):
        srcs = []
        for src in s.sources:
            n = _layers(ckpts[src.model])
            if src.layer_range[1] > n:
                raise ConfigError(
                    f"slices[{i}]: layer_range {list(src.layer_range)} exceeds the {n} layers of {src.model}",
                    f"use an end of at most {n}",
                )
            srcs.append(_Source(src.model, src.layer_range[0], src.layer_range[1], src.parameters))
        out.append(_Slice(srcs, s.base_model or config.base_model, s.parameters))
    return out


def _check_params_known(config: MergeConfig, method: MergeMethod) -> None:
    known = {p.name for p in method.params}
    scopes: list[tuple[str, Mapping[str, Any] | None]] = [("parameters", config.parameters)]
    for i, m in enumerate(config.models or []):
        scopes.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(config.slices or []):
        scopes.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            scopes.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    ignored_weight: list[str] = []
    for where, scope in scopes:
        for key in scope or {}:
            if key == "weight" and key not in known:
                ignored_weight.append(where)
            elif key not in known:
                import difflib

                close = difflib.get_close_matches(key, sorted(known), n=1)
                accepted = ", ".join(sorted(known)) or "no parameters"
                hint = f"did you mean {close[0]!r}?" if close else f"{method.name} accepts: {accepted}"
                raise ConfigError(f"{where}: unknown parameter {key!r} for merge_method {method.name!r}", hint)
    if ignored_weight:
        # mergekit ignores a ``weight`` given to a method that has none; configs written for
        # linear/TIES and switched to sce/karcher/model_stock/... keep them, so accept them too
        LOG.warning(
            "warning: merge_method %r has no 'weight' parameter; the weight in %s is ignored (as mergekit does)",
            method.name, ", ".join(ignored_weight),
        )


def _check_compatible(config: MergeConfig, ckpts: Mapping[str, Any], allow_crimes: bool) -> None:
    archs = {ref: c.architecture for ref, c in ckpts.items() if c.architecture}
    if len(set(archs.values())) > 1 and allow_crimes:
        LOG.warning("warning: merging different architectures (%s) because of --allow-crimes",
                    ", ".join(sorted(set(archs.values()))))
    elif len(set(archs.values())) > 1:
        items = list(archs.items())
        a, b = items[0], next(x for x in items if x[1] != items[0][1])
        raise CheckpointError(
            f"architectures differ: {a[0]} is {a[1]} but {b[0]} is {b[1]}",
            "merge models of the same architecture (or pass --allow-crimes, as with mergekit-yaml)",
        )


def _base_in_tensors(method: MergeMethod) -> bool:
    return bool(method.extra.get("base_in_tensors", method.base == "none"))


@dataclass
class _Context:
    """What every job of one plan shares."""

    config: MergeConfig
    ckpts: Mapping[str, Any]
    method: MergeMethod
    vocab: Any
    in_tensors: bool


def _input_names(ctx: _Context, out_name: str, sl: _Slice, layer_in: list[int | None]) -> list[tuple[str, str]]:
    """``(model, tensor name)`` of each source of ``out_name`` (layer tensors renumbered per source)."""
    names: list[tuple[str, str]] = []
    for src, idx in zip(sl.sources, layer_in):
        if idx is None:
            nm = out_name
        else:
            pre, _, rest = split_layer_name(out_name)  # type: ignore[misc]
            nm = f"{pre}.{idx}.{rest}"
        if nm not in ctx.ckpts[src.ref]:
            raise CheckpointError(
                f"tensor {nm!r} is missing from {src.ref}",
                "all inputs must share one architecture and layer layout",
            )
        names.append((src.ref, nm))
    return names


def _output_shape(ctx: _Context, out_name: str, names: list[tuple[str, str]]) -> tuple[tuple[int, ...], bool]:
    """The output shape and whether the tensor's rows are re-indexed to the output vocabulary."""
    shapes = {ref: tuple(ctx.ckpts[ref].shape(nm)) for ref, nm in names}
    vocab_tensor = ctx.ckpts[names[0][0]].embedding_name == names[0][1] or out_name.endswith("lm_head.weight")
    aligned = ctx.vocab is not None and vocab_tensor
    if len({sh[1:] if aligned else sh for sh in shapes.values()}) > 1:
        items = list(shapes.items())
        a, b = items[0], next(x for x in items if x[1] != items[0][1])
        if vocab_tensor and a[1][1:] == b[1][1:]:
            raise CheckpointError(
                f"vocabularies differ: {out_name} has {a[1][0]} rows in {a[0]} but {b[1][0]} in {b[0]}",
                "add 'tokenizer_source: union' (or base, or a model) to re-index the vocabularies",
            )
        raise CheckpointError(f"shape mismatch for {out_name}: {a[0]} has {a[1]} but {b[0]} has {b[1]}",
                              "merge models of the same size")
    shape = next(iter(shapes.values()))
    return ((ctx.vocab.vocab_size, *shape[1:]) if aligned else shape), aligned


def _base_and_entries(ctx: _Context, sl: _Slice, names: list[tuple[str, str]],
                      ) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
    """The base tensor (when the method takes it separately) and the method's inputs; checks the arity."""
    method, base_ref = ctx.method, sl.base
    base: tuple[str, str] | None = None
    if base_ref is not None and not ctx.in_tensors:
        base = next(((r, n) for r, n in names if r == base_ref), None)
        if base is None and method.base == "required":
            raise ConfigError(
                f"base_model {base_ref!r} is not among the sources of a slice",
                "add the base model to every slice's sources",
            )
    if method.base == "required" and base is None:
        raise ConfigError(f"merge_method {method.name!r} needs a base_model", "add 'base_model: <path>' to the config")
    entries = names if (ctx.in_tensors or base is None) else [(r, n) for r, n in names if r != base_ref]
    n_in = len(entries)
    if n_in < method.min_models:
        raise ConfigError(
            f"merge_method {method.name!r} needs at least {method.min_models} input model(s) besides the base, "
            f"got {n_in}", "add models to the config",
        )
    if method.max_models is not None and n_in > method.max_models:
        raise ConfigError(
            f"merge_method {method.name!r} takes at most {method.max_models} input model(s) besides the base, "
            f"got {n_in}", "remove models from the config",
        )
    return base, entries


def _global_params(ctx: _Context, sl: _Slice, out_name: str, t: float) -> dict[str, Any]:
    """The method's global parameters for one tensor: slice → top level, gradients at ``t``, declared defaults."""
    gscopes = (sl.params, ctx.config.parameters)
    params: dict[str, Any] = {}
    for p in ctx.method.global_params:
        v = resolve(p.name, gscopes, tensor_name=out_name, t=t, validate=lambda x: x)
        params[p.name] = p.resolve(v, f"parameter {p.name} ({out_name})",
                                   (f"missing required parameter {p.name!r} for tensor {out_name}",
                                    f"add '{p.name}:' under parameters"))
    return params


def _per_model_params(ctx: _Context, sl: _Slice, entries: list[tuple[str, str]], t: float) -> dict[str, list[Any]]:
    """Per-model parameters aligned with ``entries``: source → slice → top level, declared defaults."""
    per_model: dict[str, list[Any]] = {p.name: [] for p in ctx.method.per_model_params}
    src_by_ref = {s.ref: s for s in sl.sources}
    for ref, nm in entries:
        scopes = (src_by_ref[ref].params, sl.params, ctx.config.parameters)
        for p in ctx.method.per_model_params:
            v = resolve(p.name, scopes, tensor_name=nm, t=t, validate=lambda x: x)
            per_model[p.name].append(p.resolve(v, f"{ref}: parameter {p.name}",
                                               (f"missing required parameter {p.name!r} for model {ref} (tensor {nm})",
                                                f"add '{p.name}:' under that model's parameters")))
    return per_model


def _out_dtype(ctx: _Context, ref: str, name: str) -> str:
    if ctx.config.out_dtype:
        return ctx.config.out_dtype
    if ctx.config.dtype:
        return ctx.config.dtype
    d = ctx.ckpts[ref].dtype_name(name)
    return d if d in ("float32", "float16", "bfloat16", "float64") else "float32"


def _make_job(ctx: _Context, out_name: str, sl: _Slice, layer_in: list[int | None], t: float) -> TensorJob:
    """One output tensor: its inputs, base, shape, resolved parameters and storage dtype (all checked)."""
    names = _input_names(ctx, out_name, sl, layer_in)
    shape, aligned = _output_shape(ctx, out_name, names)
    base, entries = _base_and_entries(ctx, sl, names)
    params = _global_params(ctx, sl, out_name, t)
    per_model = _per_model_params(ctx, sl, entries, t)
    dtype_name = ctx.ckpts[names[0][0]].dtype_name(names[0][1])
    passthrough = dtype_name not in ("float32", "float16", "bfloat16", "float64")
    out_dtype = dtype_name if passthrough else _out_dtype(ctx, names[0][0], names[0][1])
    return TensorJob(out_name, entries, base, per_model, params, shape, out_dtype, passthrough,
                     ctx.vocab if aligned else None, tuple(r for r, _ in names))


def plan_merge(config: MergeConfig, ckpts: Mapping[str, Any], *, allow_crimes: bool = False) -> MergePlan:
    """Validate ``config`` against the opened checkpoints and build the tensor jobs.

    Args:
        config: the merge configuration.
        ckpts: model reference → opened checkpoint (see :func:`safemerge.io.references.open_checkpoint`).
        allow_crimes: accept inputs whose ``config.json`` names different architectures
            (mergekit-yaml's ``--allow-crimes``); tensor names and shapes must still match.
    """

    method = get_method(config.merge_method)
    _check_params_known(config, method)
    _check_compatible(config, ckpts, allow_crimes)
    slices = _normalize(config, ckpts)
    reference = config.base_model or slices[0].sources[0].ref
    ref_ckpt = ckpts[reference]
    vocab = build_alignment(config, ckpts, config.base_model)
    ctx = _Context(config, ckpts, method, vocab, _base_in_tensors(method))

    # non-layer tensors of the reference model: embeddings first, the rest (norm, head) last
    ref_names = [n for n in ref_ckpt.names() if split_layer_name(n) is None]
    emb = ref_ckpt.embedding_name
    pre = [n for n in ref_names if n == emb or "embed" in n or n.endswith(("wte.weight", "wpe.weight"))]
    post = [n for n in ref_names if n not in pre]
    jobs = [_make_job(ctx, n, slices[0], [None] * len(slices[0].sources), 0.0) for n in pre]
    out_layer = 0
    for sl in slices:
        n_layers = sl.sources[0].end - sl.sources[0].start
        first = sl.sources[0]
        for off in range(n_layers):
            t = off / (n_layers - 1) if n_layers > 1 else 1.0
            rests = _layer_rests(ckpts[first.ref], first.start + off)
            if not rests:
                raise CheckpointError(f"{first.ref} has no tensors for layer {first.start + off}", "check layer_range")
            layer_in = [s.start + off for s in sl.sources]
            jobs += [_make_job(ctx, f"{prefix}.{out_layer}.{rest}", sl, layer_in, t) for prefix, rest in rests]
            out_layer += 1
    jobs += [_make_job(ctx, n, slices[-1], [None] * len(slices[-1].sources), 0.0) for n in post]
    updates: dict[str, Any] = {}
    if "num_hidden_layers" in ref_ckpt.config and out_layer != ref_ckpt.config.get("num_hidden_layers"):
        updates["num_hidden_layers"] = out_layer
    if vocab is not None:
        updates["vocab_size"] = vocab.vocab_size
    return MergePlan(config, method, jobs, reference, out_layer, config.dtype, updates, vocab=vocab)


def _layer_rests(ckpt: Any, idx: int) -> list[tuple[str, str]]:
    """``(prefix, rest)`` of every tensor of block ``idx`` in a checkpoint, in name order."""
    cache = getattr(ckpt, "_sm_layer_cache", None)
    if cache is None:
        cache = {}
        for n in ckpt.names():
            parts = split_layer_name(n)
            if parts is not None:
                cache.setdefault(parts[1], []).append((parts[0], parts[2]))
        try:
            ckpt._sm_layer_cache = cache
        except AttributeError:
            pass
    return sorted(cache.get(idx, []))
