"""Automatic τ/α for SafeMERGE: a validated grid search with a harm constraint (a workflow above safety/evaluate).

SafeMERGE (Djuhera et al. 2025) merges layer ``i`` as ``α ΔW_f + (1−α) ΔW_s`` when its safety
similarity ``ρ_i = cos(C_i ΔW_f,i, ΔW_f,i)`` is below ``τ`` (SafeLoRA, Hsu et al. 2024, Eq. 2 for
``ρ``). The paper fixes ``τ`` and ``α`` by hand and names tuning ``τ`` as a limitation; no
published tool selects them. :func:`safemerge.tuning.search.autotune` does it as a constrained selection on
validation prompts:

    (τ*, α*) = argmax_{(τ, α) ∈ G}  U(τ, α)   subject to   H(τ, α) ≤ H_aligned + m
                                                        R(τ, α) ≤ R_aligned + m_R   (with a benign set)

where ``U`` is the utility accuracy, ``H`` the harmful rate and ``R`` the over-refusal rate on the
validation sets, ``H_aligned`` and ``R_aligned`` the aligned model's rates and ``m``, ``m_R`` the margins
(default 3 and 5 points). A repaired model that refuses harmless look-alikes it used to answer has not
kept its alignment, it has traded helpfulness for it — so over-refusal is a constraint, not a footnote.
Ties go to the lower harmful rate, then the larger ``α`` (closer to the fine-tuned update), then the
smaller ``τ`` (fewer merged layers). If no grid point meets the constraints, the point with the smallest
total excess over the limits is chosen and the result says so.

Cost control: the scan (``ρ`` of every layer) is computed once; two grid points that select the
same layers with the same ``α`` are the same model and are evaluated once; every merged adapter and
every generation is cached under ``work_dir``, so a rerun regenerates nothing.

Modules: ``grid`` (defaults, :class:`~safemerge.tuning.grid.GridPoint`, the search settings, τ candidates),
``pareto`` (the limits, the selection rule and the Pareto front), ``result`` (what a search returns),
``search`` (the measured coarse-to-fine search), ``report`` (tables and text) and ``plots``. ``grid`` is
torch-free: the command line reads its defaults at start-up. The command line's ``--tau auto`` parsing is
``safemerge.cli.tau_alpha``.
"""
