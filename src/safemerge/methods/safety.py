"""The safety methods as pure per-tensor functions, registered as YAML ``merge_method``s.

Convention for all four: ``base_model`` is the **unaligned / pre-trained** model and the
**first** entry of ``models`` is the **aligned** model; the remaining entries are, in order:

=============  ===============================  ==========================================
method         models (config order)            parameters (global; :mod:`.safety_params`)
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
unchanged. SafeLoRA's number mode needs every layer's ρ before deciding, so only its threshold
mode exists per tensor (use ``safemerge safelora --mode number`` for the other).

RESTA (Bhardwaj, Anh & Poria, ACL 2024, arXiv 2402.11746): the safety vector
``v = θ_aligned − θ_unaligned`` re-aligns a fine-tuned model by task arithmetic::

    θ = θ_ft + β · (θ_aligned − θ_unaligned)                          (RESTA, Eq. 1)
    θ = θ_aligned + DARE_p(θ_ft − θ_aligned) + β · (θ_aligned − θ_unaligned)   (with DARE)

MergeAlign (arXiv 2411.06824, ACL 2025 Short)::

    θ = θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre)
"""
from __future__ import annotations

import torch

from safemerge.io.checkpoint import layer_index
from safemerge.methods.registry import merge_method
from safemerge.methods.safety_params import (
    MERGEALIGN_LAMBDA_ALIGNED,
    MERGEALIGN_LAMBDA_DOMAIN,
    RESTA_BETA,
    RESTA_DENSITY,
    SAFELORA_TAU,
    SAFEMERGE_ALPHA,
    SAFEMERGE_MIN_LAYER,
    SAFEMERGE_SAFETY_GAIN,
    SAFEMERGE_TAU,
    safelora_projects,
    safemerge_in_scope,
    safemerge_merges,
    safemerge_weights,
)
from safemerge.methods.similarity import project_dense, rho_dense
from safemerge.methods.sparsify import random_drop


def _delta_is_zero(d: torch.Tensor) -> bool:
    return not bool(d.abs().max() > 0) if d.numel() else True


def _block(name: str | None) -> int | None:
    """The block index of a tensor name (``None``: outside the repeated blocks, or no name given)."""
    return None if name is None else layer_index(name)


def _scored(ft: torch.Tensor, name: str | None, block: int | None) -> bool:
    """Whether a tensor is in the similarity methods' scope: a 2-D weight inside a repeated block (``block``: the
    name's block index, parsed once by the caller; a tensor without a name is scored)."""
    return ft.ndim == 2 and (name is None or block is not None)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE as the paper writes it (Yu et al. 2024, Eq. 2): ``m ⊙ δ / p`` with ``m ~ Bernoulli(p)``.

    The mask is drawn by :func:`~safemerge.methods.sparsify.random_drop` (the one DARE mask of
    the project, the same draws as ``dare_linear``/``dare_ties`` for one generator); the
    survivors are rescaled by ``1/p`` as in the paper and RESTA, not to the L1 norm as mergekit does.
    """
    if density >= 1.0:
        return delta
    return random_drop(delta, density, rescale=False, generator=generator) / density


def resta_tensor(ft: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor, *, beta: float,
                 density: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """RESTA for one tensor (Bhardwaj et al. 2024, Eq. 1), with optional DARE on ``θ_ft − θ_aligned`` first."""
    if density is None or density >= 1.0:
        return ft + beta * (aligned - unaligned)
    return aligned + dare(ft - aligned, density, generator) + beta * (aligned - unaligned)


def mergealign_tensor(pre: torch.Tensor, domain: torch.Tensor, aligned: torch.Tensor, *, lambda_domain: float,
                      lambda_aligned: float) -> torch.Tensor:
    """MergeAlign for one tensor: ``θ_pre + λ_D (θ_D − θ_pre) + λ_A (θ_A − θ_pre)``."""
    return pre + lambda_domain * (domain - pre) + lambda_aligned * (aligned - pre)


@merge_method(
    "safemerge", params=(SAFEMERGE_TAU, SAFEMERGE_ALPHA, SAFEMERGE_SAFETY_GAIN, SAFEMERGE_MIN_LAYER),
    base="required", min_models=3, max_models=3,
    reference="SafeMERGE, Djuhera et al. 2025 (arXiv 2503.17239), merge rule with SafeLoRA's ρ "
              "(Hsu et al. 2024, Eq. 2)",
    needs_tensor_name=True,
)
def safemerge_method(tensors: list[torch.Tensor], base: torch.Tensor, *, per_model: dict[str, list],
                     params: dict[str, float], generator: torch.Generator | None = None,
                     name: str | None = None) -> torch.Tensor:
    """SafeMERGE per tensor (Djuhera et al. 2025): ``θ_aligned + α ΔW_f + g(1−α) ΔW_s`` if ρ < τ (and the tensor's
    block is ≥ ``min_layer``), else ``θ_ft``; g = ``safety_gain`` (1 and ``min_layer`` 0: the paper).

    ρ = cos(C ΔW_f, ΔW_f) with C = V Vᵀ/‖V‖_F (Hsu et al. 2024, Eq. 2), computed without C.
    """
    aligned, ft, safety = tensors
    block = _block(name)
    if not _scored(ft, name, block) or not safemerge_in_scope(block, int(params["min_layer"])):
        return ft
    d_f = ft - aligned
    if _delta_is_zero(d_f):
        return ft
    if safemerge_merges(rho_dense(aligned - base, d_f), params["tau"]):
        w_f, w_s = safemerge_weights(params["alpha"], params["safety_gain"])
        return aligned + w_f * d_f + w_s * (safety - aligned)
    return ft


@merge_method(
    "safelora", params=(SAFELORA_TAU,), base="required", min_models=2, max_models=2,
    reference="SafeLoRA, Hsu et al. 2024 (arXiv 2405.16833), Eq. 2-3, threshold mode", needs_tensor_name=True,
)
def safelora_method(tensors: list[torch.Tensor], base: torch.Tensor, *, per_model: dict[str, list],
                    params: dict[str, float], generator: torch.Generator | None = None,
                    name: str | None = None) -> torch.Tensor:
    """SafeLoRA per tensor, threshold mode (Hsu et al. 2024, Eq. 3): ``θ_aligned + C ΔW`` if ρ ≤ τ, else ``θ_ft``."""
    aligned, ft = tensors
    if not _scored(ft, name, _block(name)):
        return ft
    d_f = ft - aligned
    if _delta_is_zero(d_f):
        return ft
    V = aligned - base
    if safelora_projects(rho_dense(V, d_f), params["tau"]):
        return aligned + project_dense(V, d_f)
    return ft


@merge_method(
    "resta", params=(RESTA_BETA, RESTA_DENSITY), base="required", min_models=2, max_models=2, stochastic=True,
    reference="RESTA, Bhardwaj et al. 2024 (arXiv 2402.11746), Eq. 1; DARE, Yu et al. 2024, Eq. 2",
)
def resta_method(tensors: list[torch.Tensor], base: torch.Tensor, *, per_model: dict[str, list],
                 params: dict[str, float], generator: torch.Generator | None = None) -> torch.Tensor:
    """RESTA (Bhardwaj et al. 2024, Eq. 1): ``θ_ft + β (θ_aligned − θ_unaligned)``.

    Optionally with DARE on ``θ_ft − θ_aligned`` first (``density`` < 1, :func:`dare`).
    """
    aligned, ft = tensors
    density = params.get("density", 1.0)
    return resta_tensor(ft, aligned, base, beta=params["beta"], density=density if density < 1.0 else None,
                        generator=generator)


@merge_method(
    "mergealign", params=(MERGEALIGN_LAMBDA_DOMAIN, MERGEALIGN_LAMBDA_ALIGNED), base="required", min_models=2,
    max_models=2, reference="MergeAlign, arXiv 2411.06824 (ACL 2025 Short)",
)
def mergealign_method(tensors: list[torch.Tensor], base: torch.Tensor, *, per_model: dict[str, list],
                      params: dict[str, float], generator: torch.Generator | None = None) -> torch.Tensor:
    """MergeAlign (arXiv 2411.06824): ``θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre)``."""
    aligned, domain = tensors
    return mergealign_tensor(base, domain, aligned, lambda_domain=params["lambda_domain"],
                             lambda_aligned=params["lambda_aligned"])
