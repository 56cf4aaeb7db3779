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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError


def project_up(V: Any, sB: Any, v_norm: float | None = None) -> Any:
    """SafeLoRA's ``B ← C B`` with ``C = V Vᵀ/‖V‖_F`` (Hsu et al. 2024, Eq. 3), as ``V (Vᵀ B)/‖V‖_F``."""
    from safemerge.methods.similarity import project_dense

    return project_dense(V, sB, v_norm)


def run_safelora(
    tmp: Path, *, base: Any, aligned: Any, finetuned: Any, mode: str, tau: float, num_layers: int,
    merge_into: Any, dtype: str | None, allow_pickle: bool, allow_nonfinite: bool,
    progress: Callable[[str, int, int], None],
):
    """Score, select, project and write (adapter, or full model with ``merge_into`` / full-model input)."""
    import torch

    from safemerge.io.adapter import save_adapter
    from safemerge.io.output import write_model_card
    from safemerge.safety.results import SafeLoRAResult
    from safemerge.safety.deltas import AdapterDeltas, carried_over_parts, open_deltas
    from safemerge.safety.scoring import block_name, delta_norm_lowrank
    from safemerge.safety.selection import LayerScore, mark, select_below, select_lowest
    from safemerge.methods.similarity import project_dense, rho_dense, rho_lowrank
    from safemerge.safety.subspace import SafetySubspace, open_model
    from safemerge.safety.writing import (
        adapter_update_fn, carried_over_section, copy_adapter_side_files, params_markdown, scores_table_markdown,
        torch_dtype, write_json,
    )
    from safemerge.safety.full_model import write_updated_model

    sub = SafetySubspace(base, aligned, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    ft = open_deltas(finetuned, sub, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="--finetuned")
    target = (open_model(merge_into, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="merge-into")
              if merge_into is not None else None)
    is_adapter = isinstance(ft, AdapterDeltas)
    if is_adapter and target is None and ft.transposed:
        raise SafemergeError(f"{ft.path} has fan_in_fan_out/embedding modules, which cannot be written back", "pass --merge-into MODEL")
    carried = carried_over_parts(ft, target if target is not None else sub.aligned)

    # one pass over V: ρ and (for adapters) the projected up-projection C·(sB), both from the originals
    scores: list[LayerScore] = []
    projected: dict[str, Any] = {}
    for i, m in enumerate(ft.modules):
        sv = sub.vector(m)
        layer, name = block_name(m)
        lr = ft.lowrank(m)
        if lr is not None:
            A, sB = lr
            rho = rho_lowrank(sv.V, A, sB, v_norm=sv.norm)
            dn = delta_norm_lowrank(A, sB)
            projected[m] = project_up(sv.V, sB, sv.norm)
        else:
            D = ft.dense(m)
            rho = rho_dense(sv.V, D, v_norm=sv.norm)
            dn = float(torch.linalg.vector_norm(D))
        scores.append(LayerScore(m, layer, name, rho, dn, sv.norm, source=ft.label, rank=ft.rank(m)))
        progress("score", i + 1, len(ft.modules))
    if mode == "threshold":
        chosen = select_below(scores, tau, strict=False)  # SafeLoRA: ρ ≤ τ
        used_tau = tau
    else:
        chosen, used_tau = select_lowest(scores, num_layers)
    mark(scores, chosen)
    output = "adapter" if (is_adapter and target is None) else "model"
    res = SafeLoRAResult(out=tmp, output=output, scores=scores, mode=mode, tau=float(used_tau),
                         num_layers=num_layers if mode == "number" else None, carried_over=carried)

    def final_factors(m: str) -> tuple[Any, Any]:
        A, sB = ft.lowrank(m)  # type: ignore[misc]
        return (A, projected[m]) if m in chosen else (A, sB)

    if output == "adapter":
        factors = {m: final_factors(m) for m in ft.modules}
        save_adapter(tmp, factors, base_model_name_or_path=ft.adapter.base_model_name_or_path or str(aligned),
                     dtype=torch_dtype(dtype), extra_config=ft.adapter.non_lora_config(),
                     extra_tensors=ft.adapter.non_lora_tensors())
        copy_adapter_side_files(Path(str(finetuned)), tmp)
        card_base = ft.adapter.base_model_name_or_path or str(aligned)
    else:
        onto_ft = target is None
        model = ft.ckpt if onto_ft else target  # type: ignore[attr-defined]
        wanted = {f"{m}.weight": m for m in ft.modules}

        def upd(name: str, t: Any) -> Any:
            m = wanted.get(name)
            if m is None:
                return None
            if is_adapter:
                A, B = final_factors(m)
                return t + B @ A
            if m not in chosen:
                return None if onto_ft else t + ft.dense(m)
            sv = sub.vector(m)
            D = ft.dense(m)
            CD = project_dense(sv.V, D, sv.norm)
            return t + (CD - D) if onto_ft else t + CD

        write_updated_model(tmp, model, adapter_update_fn(ft, upd), method="safelora", dtype=dtype,
                            allow_nonfinite=allow_nonfinite, progress=lambda d, n: progress("write", d, n))
        card_base = str(model.path)
    params = [("method", "SafeLoRA (Hsu et al. 2024)"), ("mode", mode),
              ("tau" + (" (K-th smallest ρ)" if mode == "number" else " (project where ρ ≤ τ)"), f"{used_tau:.6g}"),
              ("num_layers", num_layers if mode == "number" else "n/a"), ("base (unaligned)", str(base)),
              ("aligned", str(aligned)), ("fine-tuned", str(finetuned)),
              ("layers projected", f"{len(chosen)} of {len(scores)}")]
    sections = [("SafeLoRA", "Layers with low safety similarity had their up-projection replaced by C·B, "
                 "C = V Vᵀ/‖V‖_F, V = W_aligned − W_base (unnormalised, as published).\n\n" + params_markdown(params)),
                ("Per-layer similarity", scores_table_markdown(scores, decision="projected"))]
    carried_section = carried_over_section(carried)
    if carried_section is not None:
        sections.append(carried_section)
    write_model_card(tmp, title="SafeLoRA projection", base_model=card_base, tags=["safemerge", "safety", "safelora"],
                     front_matter={"safemerge": {"method": "safelora", "mode": mode, "tau": float(used_tau),
                                                 "projected_layers": len(chosen)}},
                     sections=sections, library_name="peft" if output == "adapter" else "transformers")
    write_json(tmp / "safemerge.json", res.to_dict())
    return res
