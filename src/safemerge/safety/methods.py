"""The safety methods as YAML ``merge_method``s on dense tensors (auto-imported by the registry).

Convention for all four: ``base_model`` is the **unaligned / pre-trained** model and the
**first** entry of ``models`` is the **aligned** model; the remaining entries are, in order:

=============  ===============================  ==========================================
method         models (config order)            parameters (global)
=============  ===============================  ==========================================
``safemerge``  aligned, fine-tuned, safety      ``tau`` (0.35), ``alpha`` (0.8)
``safelora``   aligned, fine-tuned              ``tau`` (0.5)
``resta``      aligned, fine-tuned              ``beta`` (0.5), ``density`` (1.0 = no DARE)
``mergealign`` aligned, domain                  ``lambda_domain`` (0.5), ``lambda_aligned`` (0.5)
=============  ===============================  ==========================================

LoRA inputs are written ``aligned_model+adapter_dir`` (mergekit syntax) and arrive here dense.
Per tensor: ``V = θ_aligned − θ_base``, ``ΔW_x = θ_x − θ_aligned``. Similarity-based methods
(SafeMERGE, SafeLoRA) score the 2-D weights inside the repeated blocks only, like
``safemerge safemerge``/``safelora`` do; 1-D/0-D tensors (norms, biases), embeddings and
``lm_head`` (an adapter's modules_to_save, trainable tokens), and tensors the fine-tune did not
change keep the fine-tuned value — so an adapter's non-LoRA parts are carried over
unchanged. SafeLoRA's number mode needs every
layer's ρ before deciding, so only its threshold mode exists per tensor (use
``safemerge safelora --mode number`` for the other).
"""
from __future__ import annotations

from typing import Any

from safemerge.methods.registry import MergeMethod, Param, register


def _delta_is_zero(d: Any) -> bool:
    return not bool(d.abs().max() > 0) if d.numel() else True


def _scored(ft: Any, name: str | None) -> bool:
    """Whether a tensor is in the similarity methods' scope: a 2-D weight inside a repeated block."""
    from safemerge.io.checkpoint import layer_index

    return ft.ndim == 2 and (name is None or layer_index(name) is not None)


def safemerge_method(tensors: list[Any], base: Any, *, per_model: dict[str, list], params: dict[str, Any],
                     generator: Any = None, name: str | None = None) -> Any:
    """SafeMERGE per tensor (Djuhera et al. 2025): ``θ_aligned + α ΔW_f + (1−α) ΔW_s`` if ρ < τ, else ``θ_ft``.

    ρ = cos(C ΔW_f, ΔW_f) with C = V Vᵀ/‖V‖_F (Hsu et al. 2024, Eq. 2), computed without C.
    """
    from safemerge.safety.similarity import rho_dense

    aligned, ft, safety = tensors
    if not _scored(ft, name):
        return ft
    d_f = ft - aligned
    if _delta_is_zero(d_f):
        return ft
    rho = rho_dense(aligned - base, d_f)
    if rho < params["tau"]:
        alpha = params["alpha"]
        return aligned + alpha * d_f + (1.0 - alpha) * (safety - aligned)
    return ft


def safelora_method(tensors: list[Any], base: Any, *, per_model: dict[str, list], params: dict[str, Any],
                    generator: Any = None, name: str | None = None) -> Any:
    """SafeLoRA per tensor, threshold mode (Hsu et al. 2024, Eq. 3): ``θ_aligned + C ΔW`` if ρ ≤ τ, else ``θ_ft``."""
    from safemerge.safety.similarity import project_dense, rho_dense

    aligned, ft = tensors
    if not _scored(ft, name):
        return ft
    d_f = ft - aligned
    if _delta_is_zero(d_f):
        return ft
    V = aligned - base
    if rho_dense(V, d_f) <= params["tau"]:
        return aligned + project_dense(V, d_f)
    return ft


def resta_method(tensors: list[Any], base: Any, *, per_model: dict[str, list], params: dict[str, Any], generator: Any = None) -> Any:
    """RESTA (Bhardwaj et al. 2024, Eq. 1): ``θ_ft + β (θ_aligned − θ_unaligned)``, optional DARE on ``θ_ft − θ_aligned``."""
    from safemerge.safety.resta import resta_tensor

    aligned, ft = tensors
    density = params.get("density", 1.0)
    return resta_tensor(ft, aligned, base, beta=params["beta"], density=density if density < 1.0 else None, generator=generator)


def mergealign_method(tensors: list[Any], base: Any, *, per_model: dict[str, list], params: dict[str, Any], generator: Any = None) -> Any:
    """MergeAlign (arXiv 2411.06824): ``θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre)``."""
    from safemerge.safety.mergealign import mergealign_tensor

    aligned, domain = tensors
    return mergealign_tensor(base, domain, aligned, lambda_domain=params["lambda_domain"], lambda_aligned=params["lambda_aligned"])


_TAU_HELP = "ρ threshold, a cosine in [-1, 1]"

register(MergeMethod(
    name="safemerge",
    fn=safemerge_method,
    params=(
        Param("tau", 0.35, low=-1.0, high=1.0, help=_TAU_HELP + " (merge where ρ < tau), e.g. 0.35"),
        Param("alpha", 0.8, low=0.0, high=1.0, help="weight of the fine-tuned update in [0, 1], e.g. 0.8"),
    ),
    base="required", min_models=3, max_models=3,
    reference="SafeMERGE, Djuhera et al. 2025 (arXiv 2503.17239), merge rule with SafeLoRA's ρ (Hsu et al. 2024, Eq. 2)",
    extra={"roles": ["aligned", "finetuned", "safety"], "base_role": "unaligned", "needs_tensor_name": True},
))
register(MergeMethod(
    name="safelora",
    fn=safelora_method,
    params=(Param("tau", 0.5, low=-1.0, high=1.0, help=_TAU_HELP + " (project where ρ <= tau), e.g. 0.5"),),
    base="required", min_models=2, max_models=2,
    reference="SafeLoRA, Hsu et al. 2024 (arXiv 2405.16833), Eq. 2-3, threshold mode",
    extra={"roles": ["aligned", "finetuned"], "base_role": "unaligned", "needs_tensor_name": True},
))
register(MergeMethod(
    name="resta",
    fn=resta_method,
    params=(
        Param("beta", 0.5, help="scale of the safety vector θ_aligned − θ_unaligned, e.g. 0.5"),
        Param("density", 1.0, low=0.0, high=1.0, low_open=True, help="DARE keep fraction on θ_ft − θ_aligned in (0, 1]; 1 = no DARE"),
    ),
    base="required", min_models=2, max_models=2, stochastic=True,
    reference="RESTA, Bhardwaj et al. 2024 (arXiv 2402.11746), Eq. 1; DARE, Yu et al. 2024, Eq. 2",
    extra={"roles": ["aligned", "finetuned"], "base_role": "unaligned"},
))
register(MergeMethod(
    name="mergealign",
    fn=mergealign_method,
    params=(
        Param("lambda_domain", 0.5, help="λ_D, weight of the domain vector θ_domain − θ_pre, e.g. 0.5"),
        Param("lambda_aligned", 0.5, help="λ_A, weight of the alignment vector θ_aligned − θ_pre, e.g. 0.5"),
    ),
    base="required", min_models=2, max_models=2,
    reference="MergeAlign, arXiv 2411.06824 (ACL 2025 Short)",
    extra={"roles": ["aligned", "domain"], "base_role": "pretrained"},
))
