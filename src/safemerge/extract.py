"""LoRA extraction from a full fine-tune: per-module truncated SVD of ``W_ft − W_base``.

``safemerge extract-lora FINETUNED --base BASE -o ADAPTER`` (mergekit-extract-lora parity). For every
linear weight the task vector ``ΔW = W_ft − W_base`` is factorised by the singular value
decomposition ``ΔW = U S Vᵀ`` and truncated to rank ``r``; with the singular values split evenly
(mergekit's ``--distribute-scale``, its default)::

    B = U_r √S_r   (out × r),   A = √S_r V_rᵀ   (r × in),   ΔW ≈ B A

which by Eckart–Young is the best rank-``r`` approximation in Frobenius norm; its relative error
``‖ΔW − B A‖_F / ‖ΔW‖_F = √(Σ_{i>r} s_i²) / √(Σ_i s_i²)`` is read off the singular values (no
product is formed). ``r = min(max_rank, min(out, in))``, lowered to the number of singular values
above ``sv_epsilon`` when that is set. The adapter stores ``lora_alpha = r`` (scaling 1, rank
patterns for per-module ranks), as mergekit does.

What is not a linear weight follows mergekit's rules: input embeddings and ``lm_head`` are saved
at full rank in ``modules_to_save`` (or extracted as LoRA with ``embed_lora=True``: an embedding
becomes ``lora_embedding_A/B`` of ``ΔWᵀ``); other weights (norms) and any module named in
``save_modules`` are saved at full rank; changed biases are saved as PEFT biases (``bias="all"``).
Unlike mergekit, tensors the fine-tune did not change are not written at all (their ΔW is 0), so the
adapter holds the fine-tune and nothing else. Tensors are read one at a time (memory-mapped); memory
holds the low-rank factors and the full-rank saved modules until the adapter is written.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from safemerge.engine.run import single_intraop_thread
from safemerge.errors import SafemergeError
from safemerge.io.adapter import PEFT_PREFIX, save_adapter
from safemerge.io.checkpoint import Checkpoint
from safemerge.io.hub import resolve_local
from safemerge.io.output import atomic_output, check_output_path, md_escape, write_model_card
from safemerge.options import RunOptions, or_default
from safemerge.progress import StageCallback
from safemerge.safety.writing import copy_adapter_side_files, params_markdown, torch_dtype, write_json

DEFAULT_MAX_RANK = 128


@dataclass
class ModuleExtraction:
    """What happened to one tensor of the fine-tune."""

    name: str
    kind: str  # "lora", "lora_embedding", "modules_to_save", "bias", "unchanged", "below epsilon"
    rank: int | None = None
    relative_error: float | None = None
    delta_norm: float | None = None


@dataclass
class ExtractResult:
    """Outcome of :func:`extract_lora`: one record per stored tensor of the fine-tune."""

    out: Path
    modules: list[ModuleExtraction] = field(default_factory=list)

    @property
    def lora(self) -> list[ModuleExtraction]:
        return [m for m in self.modules if m.kind.startswith("lora")]

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error or 0.0 for m in self.lora), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "max_relative_error": self.max_relative_error,
                "modules": [m.__dict__ for m in self.modules]}


def truncated_factors(delta: Any, *, max_rank: int, sv_epsilon: float = 0.0) -> tuple[Any, Any, float]:
    """``(A, B, relative_error)`` with ``B A`` the rank-``r`` truncated SVD of ``delta`` (singular values split √S/√S).

    ``r = min(max_rank, min(delta.shape))``, or fewer when only that many singular values exceed
    ``sv_epsilon``; ``A`` and ``B`` are empty (rank 0) when none does.
    """

    U, S, Vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    rank = min(max_rank, int(S.shape[0]))
    if sv_epsilon > 0:
        rank = min(rank, int((S > sv_epsilon).sum()))
    total = float(torch.linalg.vector_norm(S))
    rest = float(torch.linalg.vector_norm(S[rank:]))
    root = torch.sqrt(S[:rank])
    A = root[:, None] * Vh[:rank]
    B = U[:, :rank] * root[None, :]
    return A.contiguous(), B.contiguous(), (rest / total if total > 0 else 0.0)


def _module_types(model_dir: Path) -> dict[str, str]:
    """Module path → ``"linear"`` / ``"embedding"`` / ``"output"`` / ``"other"``, from a meta-device model.

    As mergekit does, the architecture is instantiated on the ``meta`` device (no memory, no
    weights) to learn which weights belong to ``nn.Linear`` and ``nn.Embedding`` modules.
    ``trust_remote_code`` is always False.
    """

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for unknown configs
        raise SafemergeError(f"cannot read the architecture of {model_dir} ({type(exc).__name__}: {str(exc)[:160]})",
                             "extract-lora needs a transformers causal-LM directory with config.json") from exc
    out_emb = model.get_output_embeddings()
    types: dict[str, str] = {}
    for name, mod in model.named_modules():
        if mod is out_emb:
            types[name] = "output"
        elif isinstance(mod, torch.nn.Embedding):
            types[name] = "embedding"
        elif isinstance(mod, torch.nn.Linear):
            types[name] = "linear"
        else:
            types[name] = "other"
    return types


def _matches(module: str, names: Sequence[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def extract_lora(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    sv_epsilon: float = 0.0,
    embed_lora: bool = False,
    save_modules: Sequence[str] = (),
    options: RunOptions | None = None,
    progress: StageCallback | None = None,
) -> ExtractResult:
    """Extract a PEFT LoRA adapter ``base + adapter ≈ finetuned`` (see the module docstring).

    Args:
        finetuned: the fully fine-tuned model directory (or a Hub id).
        base: the model it was fine-tuned from (the adapter's base).
        out: adapter directory, written atomically (refused if it exists unless ``options.force``).
        max_rank: rank cap per module (mergekit's ``--max-rank``, default 128).
        sv_epsilon: discard singular values ``≤ sv_epsilon`` (0 keeps ``max_rank``).
        embed_lora: extract embeddings and ``lm_head`` as LoRA instead of saving them at full rank.
        save_modules: module names (or path suffixes) saved at full rank (``modules_to_save``).
        options: ``dtype`` of the factors (default: the fine-tune's), ``force``, ``allow_pickle``.
        progress: ``progress("extract", done, total)`` per tensor.

    Returns an :class:`ExtractResult`; the adapter's model card lists every module's rank and
    relative reconstruction error.
    """

    if not isinstance(max_rank, int) or max_rank <= 0:
        raise SafemergeError(f"--max-rank must be a positive integer, got {max_rank!r}", "pass e.g. --max-rank 64")
    if not (sv_epsilon >= 0 and math.isfinite(sv_epsilon)):
        raise SafemergeError(f"--sv-epsilon must be a non-negative number, got {sv_epsilon!r}",
                             "pass e.g. --sv-epsilon 1e-4")
    options = or_default(options)
    out_dtype = torch_dtype(options.dtype)
    check_output_path(out, force=options.force, inputs=(finetuned, base))
    finetuned, base = (resolve_local(p, options=options) for p in (finetuned, base))  # Hub ids → snapshots
    for role, p in (("fine-tuned model", finetuned), ("--base", base)):
        if (Path(str(p)) / "adapter_config.json").exists():
            raise SafemergeError(f"the {role} {p} is already a LoRA adapter",
                                 "extract-lora takes two full model directories")
    ft, bs = Checkpoint(finetuned, options=options), Checkpoint(base, options=options)
    types = _module_types(Path(str(finetuned)))
    names = ft.names()
    _check_same_tensors(ft, bs, names)
    result = ExtractResult(out=Path(out))
    acc = _Accumulator(result)
    with single_intraop_thread():  # the SVD's bits must not depend on the thread count (and 1 thread is faster)
        for i, name in enumerate(names):
            acc.add(name, ft, bs, types.get(name.rpartition(".")[0], "other"), max_rank=max_rank,
                    sv_epsilon=sv_epsilon, embed_lora=embed_lora, save_modules=save_modules, out_dtype=out_dtype)
            if progress is not None:
                progress("extract", i + 1, len(names))
    factors, embedding_modules, to_save, biases = acc.factors, acc.embedding_modules, acc.to_save, acc.biases
    saved: dict[str, Any] = {}
    # a module saved at full rank is saved whole (weight and bias), as PEFT's ModulesToSaveWrapper does
    for name in names:
        module = name.rpartition(".")[0]
        if module in to_save:
            saved[f"{PEFT_PREFIX}{name}"] = ft.get(name, dtype=None)
    # a changed bias is a PEFT bias (bias="all"); in a LoRA-wrapped module it lives in ``base_layer``
    biases = [b for b in biases if b.rpartition(".")[0] not in to_save]
    for name in biases:
        module = name.rpartition(".")[0]
        key = f"{module}.base_layer.bias" if module in factors else name
        saved[f"{PEFT_PREFIX}{key}"] = ft.get(name, dtype=None)
    if not factors:
        raise SafemergeError(f"{finetuned} does not differ from {base} in any linear weight (above --sv-epsilon)",
                             "check that FINETUNED was fine-tuned from --base")
    extra_config = {"modules_to_save": sorted(to_save) or None, "bias": "all" if biases else "none"}
    with atomic_output(out, force=options.force, inputs=(finetuned, base)) as tmp:
        save_adapter(tmp, factors, base_model_name_or_path=str(base), embedding_modules=embedding_modules,
                     extra_config=extra_config, extra_tensors=saved)
        copy_adapter_side_files(Path(str(finetuned)), tmp)
        _write_card(tmp, result, finetuned=finetuned, base=base, max_rank=max_rank, sv_epsilon=sv_epsilon,
                    embed_lora=embed_lora)
    return result


@dataclass
class _Accumulator:
    """What the extraction has decided so far: LoRA factors, full-rank modules, changed biases."""

    result: ExtractResult
    factors: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    embedding_modules: list[str] = field(default_factory=list)
    to_save: list[str] = field(default_factory=list)
    biases: list[str] = field(default_factory=list)

    def add(self, name: str, ft: Any, bs: Any, kind: str, *, max_rank: int, sv_epsilon: float, embed_lora: bool,
            save_modules: Sequence[str], out_dtype: Any) -> None:
        """Read one tensor of the fine-tune and the base, and decide how it is written (mergekit's rules)."""

        module, _, leaf = name.rpartition(".")
        w_ft = ft.get(name, dtype=None)
        if not w_ft.is_floating_point():
            return
        delta = w_ft.to(torch.float32) - bs.get(name, dtype=torch.float32)
        norm = float(torch.linalg.vector_norm(delta))
        record = self.result.modules.append
        full_rank = _matches(module, save_modules)
        if norm == 0.0:
            record(ModuleExtraction(name, "unchanged", delta_norm=0.0))
        elif leaf == "bias" and kind == "linear" and not full_rank:
            self.biases.append(name)
            record(ModuleExtraction(name, "bias", delta_norm=norm))
        elif leaf == "weight" and w_ft.ndim == 2 and _lora_kind(kind, embed_lora) and not full_rank:
            transpose = kind == "embedding"  # PEFT's lora_embedding_A/B factorise ΔWᵀ
            A, B, err = truncated_factors(delta.T if transpose else delta, max_rank=max_rank, sv_epsilon=sv_epsilon)
            if A.shape[0] == 0:
                record(ModuleExtraction(name, "below epsilon", rank=0, relative_error=1.0, delta_norm=norm))
                return
            self.factors[module] = (A.to(out_dtype or w_ft.dtype), B.to(out_dtype or w_ft.dtype))
            if transpose:
                self.embedding_modules.append(module)
            record(ModuleExtraction(name, "lora_embedding" if transpose else "lora", rank=int(A.shape[0]),
                                    relative_error=err, delta_norm=norm))
        else:
            if module not in self.to_save:
                self.to_save.append(module)
            record(ModuleExtraction(name, "modules_to_save", delta_norm=norm))


def _lora_kind(kind: str, embed_lora: bool) -> bool:
    """Whether a 2-D weight of this module type is extracted as LoRA (mergekit's rule)."""
    return kind == "linear" or (embed_lora and kind in ("embedding", "output"))


def _check_same_tensors(ft: Any, bs: Any, names: list[str]) -> None:
    for name in names:
        if name not in bs:
            raise SafemergeError(f"--base {bs.path} has no tensor {name!r} of the fine-tune",
                                 "pass the model the fine-tune started from")
        if tuple(ft.shape(name)) != tuple(bs.shape(name)):
            raise SafemergeError(
                f"{name} has shape {tuple(ft.shape(name))} in the fine-tune but {tuple(bs.shape(name))} in --base",
                "the vocabulary or architecture differs; resize the base model's embeddings first",
            )


def _write_card(tmp: Path, result: ExtractResult, *, finetuned: Any, base: Any, max_rank: int, sv_epsilon: float,
                embed_lora: bool) -> None:

    rows = ["| tensor | written as | rank | ‖ΔW‖_F | relative error ‖ΔW − BA‖_F/‖ΔW‖_F |",
            "|---|---|---:|---:|---:|"]
    for m in result.modules:
        if m.kind == "unchanged":
            continue
        rank = "" if m.rank is None else str(m.rank)
        err = "" if m.relative_error is None else f"{m.relative_error:.3e}"
        rows.append(f"| {md_escape(m.name)} | {m.kind} | {rank} | {m.delta_norm:.4g} | {err} |")
    unchanged = sum(m.kind == "unchanged" for m in result.modules)
    params = [("fine-tuned", str(finetuned)), ("base", str(base)), ("max rank", max_rank), ("sv epsilon", sv_epsilon),
              ("embeddings", "LoRA" if embed_lora else "modules_to_save (full rank)"),
              ("LoRA modules", len(result.lora)), ("max relative error", f"{result.max_relative_error:.3e}"),
              ("unchanged tensors (not written)", unchanged)]
    write_model_card(
        tmp, title="LoRA extracted from a full fine-tune", base_model=str(base),
        tags=["safemerge", "lora", "extract-lora"], library_name="peft",
        front_matter={"extract_lora": {"max_rank": max_rank, "sv_epsilon": sv_epsilon, "lora_modules": len(result.lora),
                                       "max_relative_error": result.max_relative_error}},
        sections=[
            ("Extraction", "Each linear weight's task vector ΔW = W_ft − W_base was factorised by truncated SVD, "
             "B = U_r √S_r, A = √S_r V_rᵀ (the best rank-r approximation); `base + adapter` reproduces the fine-tune "
             "up to the errors below.\n\n" + params_markdown(params)),
            ("Per-module reconstruction", "\n".join(rows)),
        ],
    )
    write_json(tmp / "extract_lora.json", result.to_dict() | {"out": None})
