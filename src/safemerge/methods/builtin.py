"""Registers every mergekit 0.1.5 merge method under its YAML name.

Parameter names, scopes (per-model vs global), defaults and required-ness are those of mergekit
0.1.5 (``mergekit/merge_methods/*.py``). mergekit declares no numeric ranges; the bounds below
(density ∈ (0, 1], t ∈ [0, 1], …) are ours, so bad values fail at config time with a hint
instead of producing NaNs. See ``docs/methods.md`` for how the engine passes the base model.
"""
from __future__ import annotations

from safemerge.methods.arcee_fusion import arcee_fusion_fn
from safemerge.methods.karcher import karcher_fn
from safemerge.methods.linear import linear_fn, passthrough_fn
from safemerge.methods.model_stock import model_stock_fn
from safemerge.methods.multislerp import multislerp_fn
from safemerge.methods.ram import ram_fn, ramplus_tl_fn
from safemerge.methods.registry import MergeMethod, Param, register
from safemerge.methods.sce import sce_fn
from safemerge.methods.slerp import nuslerp_fn, slerp_fn
from safemerge.methods.task_arithmetic import FAMILY, task_arithmetic_family_fn

# --- shared parameter declarations -------------------------------------------------------------

WEIGHT = Param("weight", per_model=True, help="per-model weight, e.g. parameters: {weight: 0.5}")
DENSITY = Param("density", 1.0, per_model=True, low=0.0, low_open=True, high=1.0,
                help="fraction of each task vector to keep, in (0, 1]")
GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0,
              help="fraction of the largest-magnitude entries removed as outliers, in [0, 1]")
EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0,
                help="keep-probability spread; density ± epsilon must stay inside (0, 1)")
LAMBDA = Param("lambda", 1.0, help="scale of the merged task vector")
INT8_MASK = Param("int8_mask", False, kind=bool, help="store sign masks as int8 (memory only; no numerical effect)")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, kind=bool, help="divide by the sum of the (agreeing) weights")


def _rescale(default: bool) -> Param:
    return Param("rescale", default, kind=bool, help="rescale sparsified task vectors to their original L1 norm")


_REFERENCES = {
    "task_arithmetic": "Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR), Eq. 1: θ = θ_base + λ Σ wᵢ τᵢ",
    "ties": "Yadav et al. 2023, TIES-Merging (NeurIPS), Sec. 3 / Alg. 1: trim (top-k |τ|), elect sign, disjoint mean",
    "dare_ties": "Yu et al. 2024, Language Models are Super Mario (DARE, ICML), Sec. 3 drop-and-rescale + TIES sign "
                 "election",
    "dare_linear": "Yu et al. 2024, Language Models are Super Mario (DARE, ICML), Sec. 3 drop-and-rescale + task "
                   "arithmetic",
    "breadcrumbs": "Davari & Belilovsky 2024, Model Breadcrumbs (ECCV), Sec. 3: mask top-γ outliers and small entries",
    "breadcrumbs_ties": "Davari & Belilovsky 2024, Model Breadcrumbs (ECCV), Sec. 3 + TIES sign election (Yadav et al. "
                        "2023)",
    "della": "Deep et al. 2024, DELLA-Merging, Sec. 3: MagPrune (rank-based keep probabilities), elect sign, fuse",
    "della_linear": "Deep et al. 2024, DELLA-Merging, Sec. 3: MagPrune + task arithmetic (no sign election)",
}



def _register_task_arithmetic_family() -> None:
    for name, (sparsification, _consensus, normalize_default, rescale_default) in FAMILY.items():
        params = (INT8_MASK, _normalize(normalize_default), _rescale(rescale_default), LAMBDA, WEIGHT, DENSITY)
        if sparsification == "magnitude_outliers":
            params += (GAMMA,)
        if sparsification == "della_magprune":
            params += (EPSILON,)
        register(
            MergeMethod(
                name=name,
                fn=task_arithmetic_family_fn(name),
                params=params,
                base="required",
                min_models=0,
                stochastic=sparsification in ("random", "della_magprune"),
                reference=_REFERENCES[name],
                extra={
                    "base_in_tensors": False,
                    # exact ties at top-k cut-offs: the engine passes the plan's tie_break rule
                    "tie_break": sparsification in ("magnitude", "magnitude_outliers"),
                    # no sparsification and no sign election: every output entry depends only on the
                    # same entry of the inputs, so the engine may process large tensors in row blocks
                    "elementwise": name == "task_arithmetic",
                },
            )
        )


def _register_others() -> None:
    register(MergeMethod(
        name="linear",
        fn=linear_fn,
        params=(WEIGHT, Param("normalize", True, kind=bool, help="divide by the sum of the weights")),
        base="none",
        min_models=1,
        reference="Wortsman et al. 2022, Model soups (ICML), Sec. 3: θ = Σ wᵢθᵢ / Σ wᵢ",
        extra={"base_in_tensors": True, "elementwise": True},
    ))
    register(MergeMethod(
        name="slerp",
        fn=slerp_fn,
        params=(Param("t", low=0.0, high=1.0, help="interpolation factor: 0 = base, 1 = the other model"),),
        base="required",
        min_models=1,
        max_models=1,
        reference="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH): slerp(v0, v1; t)",
        extra={"base_in_tensors": False},
    ))
    register(MergeMethod(
        name="nuslerp",
        fn=nuslerp_fn,
        params=(
            WEIGHT,
            Param("nuslerp_row_wise", False, kind=bool,
                  help="with nuslerp_flatten: false, interpolate slices along dim 0 instead of the last dim"),
            Param("nuslerp_flatten", True, kind=bool, help="interpolate the whole tensor as one vector"),
        ),
        base="optional",
        min_models=2,
        max_models=2,
        reference="Shoemake 1985 slerp with t = w₂/(w₁+w₂), on task vectors when a base is given (mergekit nuslerp)",
        extra={"base_in_tensors": False},
    ))
    register(MergeMethod(
        name="multislerp",
        fn=multislerp_fn,
        params=(
            WEIGHT,
            Param("normalize_weights", True, kind=bool, help="divide the weights by their sum"),
            Param("eps", 1e-8, low=0.0, help="small constant added to norms"),
        ),
        base="optional",
        min_models=1,
        reference="Goddard 2025, Multi-SLERP; Buss & Fillmore 2001, Spherical averages: barycentric interpolation on "
                  "the sphere",
        extra={"base_in_tensors": False},
    ))
    register(MergeMethod(
        name="karcher",
        fn=karcher_fn,
        params=(
            Param("max_iter", 10, kind=int, low=0, help="maximum fixed-point iterations"),
            Param("tol", 1e-5, low=0.0, help="convergence tolerance on the tangent norm"),
        ),
        base="none",
        min_models=1,
        reference="Karcher 1977, Riemannian center of mass; Buss & Fillmore 2001 fixed-point iteration (equal weights)",
        extra={"base_in_tensors": True},
    ))
    register(MergeMethod(
        name="model_stock",
        fn=model_stock_fn,
        params=(Param("filter_wise", False, kind=bool, help="one interpolation ratio per row instead of per tensor"),),
        base="required",
        min_models=2,
        reference="Jang et al. 2024, Model Stock (ECCV), Sec. 3: t = N cosθ / (1 + (N−1) cosθ), θ = t θ_avg + (1−t) "
                  "θ_base",
        extra={"base_in_tensors": False},
    ))
    register(MergeMethod(
        name="sce",
        fn=sce_fn,
        params=(INT8_MASK, Param("select_topk", 1.0, low=0.0, low_open=True, high=1.0,
                                 help="fraction of highest-variance entries kept, in (0, 1]")),
        base="required",
        min_models=0,
        reference="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models, Sec. 3.3 (SCE: select, calculate, "
                  "erase)",
        extra={"base_in_tensors": False, "tie_break": True},
    ))
    register(MergeMethod(
        name="passthrough",
        fn=passthrough_fn,
        params=(Param("scale", None, per_model=True, help="optional factor applied to the copied tensor"),),
        base="none",
        min_models=1,
        max_models=1,
        reference="Goddard et al. 2024, Arcee's MergeKit (EMNLP industry), passthrough / frankenmerging",
        extra={"base_in_tensors": True, "elementwise": True},
    ))


def _register_mergekit_head() -> None:
    """Methods that mergekit added after its 0.1 series' first releases (present in 0.1.5)."""
    register(MergeMethod(
        name="arcee_fusion",
        fn=arcee_fusion_fn,
        base="required",
        min_models=1,
        max_models=1,
        reference="Arcee AI 2024, Arcee Fusion (mergekit): keep Δ where |Δ|·KL(softmax θ‖softmax θ₀) ≥ Q₂+1.5·IQR",
        extra={"base_in_tensors": False},
    ))
    ram_epsilon = Param("epsilon", 1e-5, low=0.0, help="|δ| above which a model counts as having changed an entry")
    ram_reference = "Reinforced Agent Merging (RAM), arXiv:2601.13572: unique updates kept, shared updates averaged"
    register(MergeMethod(
        name="ram",
        fn=ram_fn,
        params=(ram_epsilon,),
        base="required",
        min_models=0,
        reference=ram_reference,
        extra={"base_in_tensors": False, "elementwise": True},
    ))
    register(MergeMethod(
        name="ramplus_tl",
        fn=ramplus_tl_fn,
        params=(
            Param("r", 0.1, low=0.0, help="strength of the rescaling of unique updates"),
            Param("alpha", 0.2, low=0.0, help="cap on the shared/unique ratio rho"),
            ram_epsilon,
        ),
        base="required",
        min_models=0,
        reference=ram_reference + "; RAM+ scales unique updates by 1 + r·clip(ρ, 0, α) (tensor-local ρ)",
        extra={"base_in_tensors": False},
    ))


_register_task_arithmetic_family()
_register_others()
_register_mergekit_head()
