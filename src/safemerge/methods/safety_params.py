"""The one home of the safety methods' parameters, defaults and selection rules.

Every caller — the registered YAML methods (:mod:`.safety`), ``safemerge.safety.api``, the CLI
defaults and validation, layer selection (:mod:`safemerge.safety.selection`) and the automatic
τ/α search (``safemerge.tuning``) — reads them from here. Each :class:`Param` declares its
default and range; :meth:`Param.check` is the only validator (``check(value, "--tau")`` names the
flag in the error).

* SafeMERGE (Djuhera et al. 2025, arXiv 2503.17239, §3): layer i is merged iff ``ρ_i < τ``
  (strict), τ = 0.35 and α = 0.8 by default (the reference code's values).
  Two extensions, both off by default (the paper's rule): ``min_layer`` restricts the merge to blocks
  ``≥ min_layer`` (the late blocks, where the demo's 135M fine-tune carries most of its erosion and none of
  its skill, docs/demo.md) and ``safety_gain`` g weighs the safety update by ``g (1−α)`` instead of ``1−α``.
* SafeLoRA (Hsu et al. 2024, arXiv 2405.16833, §3.2): project iff ``ρ_i ≤ τ``; τ = 0.5
  (threshold mode), K = 10 (number mode).
* RESTA (Bhardwaj et al. 2024, Eq. 1): β = 0.5; DARE keep fraction in (0, 1], 1 = none.
* MergeAlign (arXiv 2411.06824): λ_D = λ_A = 0.5.

Torch-free, so the CLI can read the defaults at import time.
"""
from __future__ import annotations

from safemerge.errors import ConfigError
from safemerge.methods.registry import Param

_TAU_HELP = "ρ threshold, a cosine in [-1, 1]"

SAFEMERGE_TAU = Param("tau", 0.35, low=-1.0, high=1.0, help=_TAU_HELP + " (merge where ρ < tau), e.g. 0.35")
SAFEMERGE_ALPHA = Param("alpha", 0.8, low=0.0, high=1.0, help="weight of the fine-tuned update in [0, 1], e.g. 0.8")
SAFEMERGE_SAFETY_GAIN = Param("safety_gain", 1.0, low=0.0,
                              help="g >= 0: merged layers get α ΔW_f + g(1−α) ΔW_s; 1 = the paper, e.g. 2")
SAFEMERGE_MIN_LAYER = Param("min_layer", 0, kind=int, low=0,
                            help="merge only in blocks >= this index (0 = every block, the paper), e.g. 25")
SAFEMERGE_DENSITY = Param("density", 0.5, low=0.0, low_open=True, high=1.0,
                          help="keep fraction for dare_linear/ties/dare_ties in (0, 1], e.g. 0.5")
SAFELORA_TAU = Param("tau", 0.5, low=-1.0, high=1.0, help=_TAU_HELP + " (project where ρ <= tau), e.g. 0.5")
SAFELORA_NUM_LAYERS = Param("num_layers", 10, kind=int, low=1, help="K, the number of lowest-ρ layers, e.g. 10")
RESTA_BETA = Param("beta", 0.5, help="scale of the safety vector θ_aligned − θ_unaligned, e.g. 0.5")
RESTA_DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True,
                      help="DARE keep fraction on θ_ft − θ_aligned in (0, 1]; 1 = no DARE, e.g. 0.9")
MERGEALIGN_LAMBDA_DOMAIN = Param("lambda_domain", 0.5,
                                 help="λ_D, weight of the domain vector θ_domain − θ_pre, e.g. 0.5")
MERGEALIGN_LAMBDA_ALIGNED = Param("lambda_aligned", 0.5,
                                  help="λ_A, weight of the alignment vector θ_aligned − θ_pre, e.g. 0.5")


def safemerge_merges(rho: float, tau: float) -> bool:
    """SafeMERGE's rule (Djuhera et al. 2025, §3): a layer is merged iff ``ρ < τ`` — strictly."""
    return rho < tau


def safemerge_in_scope(layer: int | None, min_layer: int) -> bool:
    """The ``min_layer`` extension: only blocks ``≥ min_layer`` may be merged (``0``: all, the paper)."""
    return min_layer <= 0 or (layer is not None and layer >= min_layer)


def safemerge_weights(alpha: float, safety_gain: float = 1.0) -> tuple[float, float]:
    """``(w_f, w_s)`` of a merged layer: SafeMERGE's ``α ΔW_f + (1−α) ΔW_s`` (Djuhera et al. 2025, §3) with the
    safety update scaled by ``safety_gain`` (1 = the paper's convex weights)."""
    return alpha, safety_gain * (1.0 - alpha)


def safelora_projects(rho: float, tau: float) -> bool:
    """SafeLoRA's threshold rule (Hsu et al. 2024, §3.2): a layer is projected iff ``ρ ≤ τ``."""
    return rho <= tau

# How SafeMERGE combines the two updates of a merged layer (safemerge.methods.update_merge), and its compatibility
# mode (PEFT 0.14's factor-wise mixing of equal-rank adapters).
SAFEMERGE_STRATEGIES = ("linear", "dare_linear", "ties", "dare_ties")
SAFEMERGE_COMPAT_MODES = ("reference",)


def check_strategy(strategy: str, compat: str | None) -> None:
    """A SafeMERGE ``--strategy`` and ``--compat`` mode that exist and go together (compat: linear only)."""
    if strategy not in SAFEMERGE_STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}", f"use one of: {', '.join(SAFEMERGE_STRATEGIES)}")
    if compat is not None and compat not in SAFEMERGE_COMPAT_MODES:
        raise ConfigError(f"unknown --compat mode {compat!r}",
                          "the only mode is 'reference' (PEFT 0.14 factor-wise mixing)")
    if compat is not None and strategy != "linear":
        raise ConfigError("--compat reference only applies to --strategy linear",
                          "drop --compat or use --strategy linear")
