"""SafeLoRA (Hsu et al., NeurIPS 2024, arXiv 2405.16833): project low-similarity LoRA layers
onto the safety subspace.

Eq. 3 of the paper (and ``IBM/SafeLoRA/model.py``): for a layer whose similarity
``ρ = cos(C B A, B A)`` is at most τ, the up-projection is replaced by ``B ← C B`` with the
**unnormalised** ``C = V Vᵀ / ‖V‖_F``; ``A`` is unchanged. Here ``C B = V (Vᵀ B)/‖V‖_F``
(O(out·in·r), no out × out matrix). Selection: ``ρ ≤ τ`` (threshold mode, τ = 0.5) or the K
lowest ρ (number mode, K = 10). Projections are computed once, from the original factors, in
the same pass that computes ρ — so no layer is projected twice (the PEFT port's bug).
"""
from __future__ import annotations

from pathlib import Path

import torch

from safemerge.engine.tensorwise import TensorUpdate
from safemerge.errors import SafemergeError
from safemerge.io.adapter import save_adapter
from safemerge.io.output import write_model_card
from safemerge.io.references import ModelRef
from safemerge.methods.similarity import project_dense, rho_dense, rho_lowrank
from safemerge.options import RunOptions
from safemerge.progress import StageCallback
from safemerge.safety.deltas import AdapterDeltas, DeltaSource, carried_over_parts, open_deltas
from safemerge.safety.full_model import write_updated_model
from safemerge.safety.results import SafeLoRAResult
from safemerge.safety.scoring import block_name, delta_norm_lowrank
from safemerge.safety.selection import LayerScore, mark, select_below, select_lowest
from safemerge.safety.subspace import SafetySubspace, open_model
from safemerge.safety.writing import (
    adapter_update_fn,
    carried_over_section,
    copy_adapter_side_files,
    params_markdown,
    scores_table_markdown,
    torch_dtype,
    write_json,
)

Factors = tuple[torch.Tensor, torch.Tensor]


def score_and_project(sub: SafetySubspace, ft: DeltaSource,
                      progress: StageCallback) -> tuple[list[LayerScore], dict[str, torch.Tensor]]:
    """One pass over V: every module's ρ and, for a LoRA, its projected up-projection ``C·(sB)``.

    Both come from the original factors, so no layer is projected twice (the PEFT port's bug).
    """
    scores: list[LayerScore] = []
    projected: dict[str, torch.Tensor] = {}
    for i, m in enumerate(ft.modules):
        sv = sub.vector(m)
        layer, name = block_name(m)
        lr = ft.lowrank(m)
        if lr is not None:
            A, sB = lr
            rho = rho_lowrank(sv.V, A, sB, v_norm=sv.norm)
            dn = delta_norm_lowrank(A, sB)
            projected[m] = project_dense(sv.V, sB, sv.norm)  # Eq. 3: B ← C B = V (Vᵀ B)/‖V‖_F
        else:
            D = ft.dense(m)
            rho = rho_dense(sv.V, D, v_norm=sv.norm)
            dn = float(torch.linalg.vector_norm(D))
        scores.append(LayerScore(m, layer, name, rho, dn, sv.norm, source=ft.label, rank=ft.rank(m)))
        progress("score", i + 1, len(ft.modules))
    return scores, projected


def select_layers(scores: list[LayerScore], mode: str, tau: float, num_layers: int) -> tuple[set[str], float]:
    """Threshold mode: ``ρ ≤ τ``; number mode: the ``num_layers`` lowest ρ (ties included). Returns (layers, τ used)."""
    if mode == "threshold":
        return select_below(scores, tau, strict=False), tau
    return select_lowest(scores, num_layers)


def _final_factors(ft: AdapterDeltas, chosen: set[str], projected: dict[str, torch.Tensor], m: str) -> Factors:
    A, sB = ft.lowrank(m)
    return (A, projected[m]) if m in chosen else (A, sB)


def _write_adapter(tmp: Path, ft: AdapterDeltas, chosen: set[str], projected: dict[str, torch.Tensor], *,
                   dtype: str | None, finetuned: ModelRef, aligned: ModelRef) -> str:
    """The projected adapter (exact factors, ``A`` unchanged); returns the base model named in the card."""
    factors = {m: _final_factors(ft, chosen, projected, m) for m in ft.modules}
    base_name = ft.adapter.base_model_name_or_path or str(aligned)
    save_adapter(tmp, factors, base_model_name_or_path=base_name, dtype=torch_dtype(dtype),
                 extra_config=ft.adapter.non_lora_config(), extra_tensors=ft.adapter.non_lora_tensors())
    copy_adapter_side_files(Path(str(finetuned)), tmp)
    return base_name


def _model_update(sub: SafetySubspace, ft: DeltaSource, chosen: set[str], projected: dict[str, torch.Tensor], *,
                  onto_ft: bool) -> TensorUpdate:
    """Per-tensor update of the written model: ``W + B'A`` (adapters) or ``W + C ΔW`` on chosen layers.

    ``onto_ft``: the model written is the full fine-tune itself (only chosen layers change, by ``CΔW − ΔW``);
    otherwise it is ``--merge-into`` and every layer gets its (projected or not) update added.
    """
    wanted = {f"{m}.weight": m for m in ft.modules}

    def update(name: str, t: torch.Tensor) -> torch.Tensor | None:
        m = wanted.get(name)
        if m is None:
            return None
        if isinstance(ft, AdapterDeltas):
            A, B = _final_factors(ft, chosen, projected, m)
            return t + B @ A
        if m not in chosen:
            return None if onto_ft else t + ft.dense(m)
        sv = sub.vector(m)
        D = ft.dense(m)
        CD = project_dense(sv.V, D, sv.norm)
        return t + (CD - D) if onto_ft else t + CD

    return update


def _write_card(tmp: Path, res: SafeLoRAResult, chosen: set[str], *, num_layers: int, card_base: str,
                base: ModelRef, aligned: ModelRef, finetuned: ModelRef) -> None:
    mode, used_tau = res.mode, res.tau
    params = [("method", "SafeLoRA (Hsu et al. 2024)"), ("mode", mode),
              ("tau" + (" (K-th smallest ρ)" if mode == "number" else " (project where ρ ≤ τ)"), f"{used_tau:.6g}"),
              ("num_layers", num_layers if mode == "number" else "n/a"), ("base (unaligned)", str(base)),
              ("aligned", str(aligned)), ("fine-tuned", str(finetuned)),
              ("layers projected", f"{len(chosen)} of {len(res.scores)}")]
    sections = [("SafeLoRA", "Layers with low safety similarity had their up-projection replaced by C·B, "
                 "C = V Vᵀ/‖V‖_F, V = W_aligned − W_base (unnormalised, as published).\n\n" + params_markdown(params)),
                ("Per-layer similarity", scores_table_markdown(res.scores, decision="projected"))]
    carried_section = carried_over_section(res.carried_over)
    if carried_section is not None:
        sections.append(carried_section)
    write_model_card(tmp, title="SafeLoRA projection", base_model=card_base, tags=["safemerge", "safety", "safelora"],
                     front_matter={"safemerge": {"method": "safelora", "mode": mode, "tau": float(used_tau),
                                                 "projected_layers": len(chosen)}},
                     sections=sections, library_name="peft" if res.output == "adapter" else "transformers")


def run_safelora(
    tmp: Path, *, base: ModelRef, aligned: ModelRef, finetuned: ModelRef, mode: str, tau: float, num_layers: int,
    merge_into: ModelRef | None, options: RunOptions, progress: StageCallback,
) -> SafeLoRAResult:
    """Score, select, project and write (adapter, or full model with ``merge_into`` / full-model input)
    in ``options.dtype`` (default: the inputs')."""
    sub = SafetySubspace(base, aligned, options=options)
    ft = open_deltas(finetuned, sub, role="--finetuned", options=options)
    target = open_model(merge_into, role="merge-into", options=options) if merge_into is not None else None
    is_adapter = isinstance(ft, AdapterDeltas)
    if is_adapter and target is None and ft.transposed:
        raise SafemergeError(f"{ft.path} has fan_in_fan_out/embedding modules, which cannot be written back",
                             "pass --merge-into MODEL")
    carried = carried_over_parts(ft, target if target is not None else sub.aligned)
    scores, projected = score_and_project(sub, ft, progress)
    chosen, used_tau = select_layers(scores, mode, tau, num_layers)
    mark(scores, chosen)
    output = "adapter" if (is_adapter and target is None) else "model"
    res = SafeLoRAResult(out=tmp, output=output, scores=scores, mode=mode, tau=float(used_tau),
                         num_layers=num_layers if mode == "number" else None, carried_over=carried)
    if output == "adapter":
        card_base = _write_adapter(tmp, ft, chosen, projected, dtype=options.dtype, finetuned=finetuned,
                                   aligned=aligned)
    else:
        model = ft.ckpt if target is None else target  # type: ignore[attr-defined]
        update = _model_update(sub, ft, chosen, projected, onto_ft=target is None)
        write_updated_model(tmp, model, adapter_update_fn(ft, update), method="safelora", options=options,
                            progress=lambda d, n: progress("write", d, n))
        card_base = str(model.path)
    _write_card(tmp, res, chosen, num_layers=num_layers, card_base=card_base, base=base, aligned=aligned,
                finetuned=finetuned)
    write_json(tmp / "safemerge.json", res.to_dict())
    return res
