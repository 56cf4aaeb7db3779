"""SafeMERGE per-layer updates and output writing (adapter or full model + model card).

The math lives in :mod:`safemerge.methods.update_merge`; this module decides, per fine-tuned module,
which realisation applies and writes the result: the exact low-rank adapter here, a full model as an
engine plan (:func:`safemerge.safety.full_model.write_updated_model`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safemerge.engine.tensorwise import TensorUpdate
from safemerge.errors import CheckpointError
from safemerge.io.adapter import save_adapter
from safemerge.io.output import markdown_section, md_escape, write_model_card
from safemerge.io.references import ModelRef, OpenedModel
from safemerge.methods.safety_params import safemerge_weights
from safemerge.methods.update_merge import merge_dense, merge_linear_factors, merge_reference_factors, truncate_svd
from safemerge.options import RunOptions
from safemerge.progress import StageCallback
from safemerge.safety.deltas import AdapterDeltas, DeltaSource
from safemerge.safety.full_model import write_updated_model
from safemerge.safety.results import SafeMergeResult
from safemerge.safety.settings import SafeMergeModels, SafeMergeSettings
from safemerge.safety.writing import (
    adapter_update_fn,
    carried_over_section,
    copy_adapter_side_files,
    params_markdown,
    scores_table_markdown,
    torch_dtype,
    write_json,
)


@dataclass
class LayerUpdate:
    """The final ΔW of one module: exact factors ``(A, B)`` (ΔW = B A) or a dense tensor."""

    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    dense: torch.Tensor | None = None
    svd_rank: int | None = None

    def as_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        A, B = self.factors  # type: ignore[misc]
        return B @ A


def build_layer_update(
    ft: DeltaSource, sf: DeltaSource, merged: set[str], settings: SafeMergeSettings, *, seed: int | None,
) -> Callable[[str], LayerUpdate]:
    """Return ``module → LayerUpdate`` implementing SafeMERGE's rule for ``settings.strategy``.

    Merged modules (ρ < τ) get ``α ΔW_f + g(1−α) ΔW_s`` (g = ``settings.safety_gain``, 1 in the paper; ``ΔW_s = 0``
    where the safety adapter does not adapt the module, as PEFT's weighted merge does); others keep ``ΔW_f``.
    ``seed``: the DARE strategies' per-tensor generators.
    """
    sf_mods = set(sf.modules)
    w_f, w_s = safemerge_weights(settings.alpha, settings.safety_gain)
    strategy, compat, density = settings.strategy, settings.compat, settings.density

    def raw(src: AdapterDeltas, m: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        mod = src.adapter[m]
        return mod.A.float(), mod.B.float(), mod.scaling

    def update(m: str) -> LayerUpdate:
        has_s = m in sf_mods
        if compat == "reference":
            assert isinstance(ft, AdapterDeltas) and isinstance(sf, AdapterDeltas)
            A_f, B_f, s_f = raw(ft, m)
            if has_s:
                A_s, B_s, s_s = raw(sf, m)
            else:
                A_s, B_s, s_s = torch.zeros_like(A_f), torch.zeros_like(B_f), 0.0
            weights = (w_f, w_s) if m in merged else (1.0, 0.0)
            return LayerUpdate(factors=merge_reference_factors(A_f, B_f, s_f, A_s, B_s, s_s, *weights))
        lr_f = ft.lowrank(m)
        if m not in merged:
            return LayerUpdate(factors=lr_f) if lr_f is not None else LayerUpdate(dense=ft.dense(m))
        lr_s = sf.lowrank(m) if has_s else None
        if strategy == "linear" and lr_f is not None and (lr_s is not None or not has_s):
            A_f, sB_f = lr_f
            if lr_s is None:
                return LayerUpdate(factors=(A_f, sB_f * w_f))
            return LayerUpdate(factors=merge_linear_factors(A_f, sB_f, lr_s[0], lr_s[1], w_f, w_s))
        D_f = ft.dense(m)
        D_s = sf.dense(m) if has_s else torch.zeros_like(D_f)
        D = merge_dense(D_f, D_s, weights=(w_f, w_s), strategy=strategy, density=density, module=m, seed=seed)
        r = (ft.rank(m) or 0) + ((sf.rank(m) or 0) if has_s else 0)
        return LayerUpdate(dense=D, svd_rank=r or None)

    return update


def _extension_params(result: SafeMergeResult) -> list[tuple[str, float | int]]:
    """Card rows for the extensions in use (none for the paper's rule)."""
    names = {"safety_gain": "safety gain g (ΔW_s weighted g(1−α); the paper: 1)",
             "min_layer": "min layer (only blocks ≥ it merged; the paper: 0)"}
    return [(names[k], v) for k, v in result.extensions().items()]


def _rule_sentence(result: SafeMergeResult) -> str:
    """What was done to which layers, in the card's words."""
    ext = result.extensions()
    where = f" in blocks ≥ {ext['min_layer']}" if "min_layer" in ext else ""
    update = f"α ΔW_f + {ext['safety_gain']:g}·(1−α) ΔW_s" if "safety_gain" in ext else "α ΔW_f + (1−α) ΔW_s"
    return ("Layers whose safety similarity ρ = cos(C ΔW_f, ΔW_f), C = V Vᵀ/‖V‖_F, "
            f"V = W_aligned − W_base, is below τ{where} were replaced by {update}; all other layers keep ΔW_f.")


def _card(result: SafeMergeResult, models: SafeMergeModels, *, merge_into: str | Path | None,
          eval_md: str | None) -> tuple[dict, list]:
    params = [
        ("method", "SafeMERGE (Djuhera et al. 2025)"),
        ("tau (merge where ρ < τ)", result.tau),
        ("alpha (weight of the task update)", result.alpha),
        *_extension_params(result),
        ("strategy", result.strategy),
        ("compat", result.compat or "none (exact α ΔW_f + (1−α) ΔW_s)"),
        ("seed", result.seed),
        ("density", result.density),
        ("base (unaligned)", str(models.base)),
        ("aligned", str(models.aligned)),
        ("fine-tuned", str(models.finetuned)),
        ("safety", str(models.safety)),
        ("merge-into", str(merge_into) if merge_into is not None else "none"),
        ("layers merged", f"{len(result.merged)} of {len(result.scores)}"),
    ]
    sections = [
        ("SafeMERGE", _rule_sentence(result) + "\n\n" + params_markdown(params)),
        ("Per-layer similarity", scores_table_markdown(result.scores, decision="merged")),
    ]
    if result.reconstruction_error:
        rows = ["| module | rank | relative error ‖ΔW − BA‖_F/‖ΔW‖_F |", "|---|---:|---:|"]
        for m, e in result.reconstruction_error.items():
            rows.append(f"| {md_escape(m)} | {result.svd_ranks.get(m, '')} | {e:.3e} |")
        sections.append(("Truncated-SVD reconstruction", "Dense merged layers were written back as LoRA factors "
                         "by truncated SVD at rank r_f + r_s.\n\n" + "\n".join(rows)))
    carried = carried_over_section(result.carried_over)
    if carried is not None:
        sections.append(carried)
    if result.ignored_safety_modules:
        sections.append(("Ignored safety modules", "The safety adapter changes parts the fine-tuned adapter does not "
                         "(ΔW_f = 0 there, ρ is undefined) or outside LoRA; they were left out:\n\n"
                         + "\n".join(f"- {md_escape(m)}" for m in result.ignored_safety_modules)))
    if eval_md:
        sections.append(markdown_section(eval_md))
    fm = {"safemerge": {"method": "safemerge", "tau": result.tau, "alpha": result.alpha, "strategy": result.strategy,
                        "compat": result.compat, "seed": result.seed, "merged_layers": len(result.merged)}}
    return fm, sections


LayerUpdates = Callable[[str], LayerUpdate]


def _write_adapter(tmp: Path, result: SafeMergeResult, ft: AdapterDeltas, update_fn: LayerUpdates, *,
                   dtype: str | None, aligned_path: ModelRef, progress: StageCallback) -> str:
    """The merged adapter: exact factors, or dense layers truncated back to rank r_f + r_s by SVD.

    Records each truncated layer's relative error and rank in ``result``; returns the card's base model.
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, m in enumerate(ft.modules):
        upd = update_fn(m)
        if upd.factors is not None:
            A, B = upd.factors
        else:
            A, B, err = truncate_svd(upd.dense, upd.svd_rank or 1)
            result.reconstruction_error[m] = err
            result.svd_ranks[m] = int(A.shape[0])
        factors[m] = (A.contiguous(), B.contiguous())
        progress("write", i + 1, len(ft.modules))
    base_name = ft.adapter.base_model_name_or_path or str(aligned_path)
    save_adapter(tmp, factors, base_model_name_or_path=base_name, dtype=torch_dtype(dtype),
                 extra_config=ft.adapter.non_lora_config(), extra_tensors=ft.adapter.non_lora_tensors())
    copy_adapter_side_files(ft.path, tmp)
    return base_name


def _check_target(model: OpenedModel, aligned: OpenedModel, modules: list[str]) -> None:
    """Every merged module's weight exists in the written model with the aligned model's shape."""
    for m in modules:
        w = f"{m}.weight"
        if w not in model:
            raise CheckpointError(f"--merge-into model {model.path} has no tensor {w!r}",
                                  "merge into the model the adapters were trained on")
        if tuple(model.shape(w)) != tuple(aligned.shape(w)):
            raise CheckpointError(
                f"{w} has shape {tuple(model.shape(w))} in {model.path} but {tuple(aligned.shape(w))} "
                "in the aligned model", "merge into the model the adapters were trained on")


def _model_update(ft: DeltaSource, merged: set[str], update_fn: LayerUpdates, *, onto_ft: bool) -> TensorUpdate:
    """Per-tensor update of the written model.

    ``onto_ft``: the model is the full fine-tune itself — merged layers change by ``ΔW' − ΔW_f``,
    the rest stay; otherwise (``--merge-into``) every adapted layer gets its final ``ΔW'`` added.
    """
    wanted = {f"{m}.weight": m for m in ft.modules}

    def update(name: str, t: torch.Tensor) -> torch.Tensor | None:
        m = wanted.get(name)
        if m is None or (onto_ft and m not in merged):
            return None
        if onto_ft:
            return t + (update_fn(m).as_dense() - ft.dense(m))
        return t + update_fn(m).as_dense()

    return update


def write_safemerge_output(
    tmp: Path, result: SafeMergeResult, ft: DeltaSource, update_fn: LayerUpdates, *, models: SafeMergeModels,
    target: OpenedModel | None, aligned: OpenedModel, options: RunOptions, progress: StageCallback,
    evaluate: Callable[[Path], tuple[Any, str]] | None = None,
) -> None:
    """Write the adapter (exact factors / truncated SVD) or the full model (an engine plan), then the model card.

    ``update_fn`` gives each module of ``ft`` its final ΔW (:func:`build_layer_update`; the layers merged are
    ``result.merged``); ``target`` is the ``--merge-into`` model or ``None``, ``aligned`` the aligned checkpoint
    (shapes checked against it), ``models`` the inputs named in the card. Weights in ``options.dtype`` (default:
    the inputs')."""
    result.svd_ranks = {}
    if result.output == "adapter":
        assert isinstance(ft, AdapterDeltas)
        base_model_card = _write_adapter(tmp, result, ft, update_fn, dtype=options.dtype,
                                         aligned_path=models.aligned, progress=progress)
    else:
        model = ft.ckpt if target is None else target  # type: ignore[attr-defined]
        _check_target(model, aligned, list(ft.modules))
        update = _model_update(ft, set(result.merged), update_fn, onto_ft=target is None)
        write_updated_model(tmp, model, adapter_update_fn(ft, update), method="safemerge", options=options,
                            progress=lambda d, n: progress("write", d, n))
        base_model_card = str(model.path)
    eval_md = None
    if evaluate is not None:
        result.evaluation, eval_md = evaluate(tmp)
    fm, sections = _card(result, models, merge_into=None if target is None else target.path, eval_md=eval_md)
    adapter = result.output == "adapter"
    write_model_card(tmp, title="SafeMERGE merge", base_model=base_model_card,
                     tags=["safemerge", "safety", "lora" if adapter else "merge"], front_matter=fm, sections=sections,
                     library_name="peft" if adapter else "transformers")
    write_json(tmp / "safemerge.json", result.to_dict())
