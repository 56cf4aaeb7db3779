"""Sparsifiers for task vectors: magnitude (TIES), random (DARE), magnitude_outliers
(Breadcrumbs) and della_magprune (DELLA).

Each takes one task vector ``δ = θ − θ_base`` (float32) and returns a sparsified copy with the
same shape; with ``rescale`` the survivors are scaled so the L1 norm of the result equals
``‖δ‖₁`` (see :func:`safemerge.methods._tensor.masked_rescaled`). Semantics, including the edge
cases, follow mergekit 0.1.5 (``mergekit/sparsify.py``).
"""
from __future__ import annotations

import torch

from safemerge.errors import ConfigError
from safemerge.methods._tensor import masked_rescaled, rank_window_mask


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False, inplace: bool = False,
              tie_break: str = "index") -> torch.Tensor:
    """Keep the ``k = max(1, ⌊density·n⌋)`` largest-magnitude entries (TIES "Trim").

    Yadav et al. 2023, "TIES-Merging", Sec. 3, step 1: ``τ̂ = keep_topk_reset_rest_to_zero(τ, k)``.
    ``density ≥ 1`` returns ``delta`` unchanged; ``density ≤ 0`` returns zeros. Uses two
    ``kthvalue`` selections, not a full argsort. ``tie_break="mergekit"``: exact ties at the
    cut-off keep the entries mergekit's argsort keeps.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    mergekit_ties = (lambda f: torch.argsort(f, descending=True)[:k]) if tie_break == "mergekit" else None
    mask = rank_window_mask(delta.abs(), n - k, k, tie_select=mergekit_ties)
    return masked_rescaled(delta, mask, rescale, inplace=inplace)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False,
                       inplace: bool = False, tie_break: str = "index") -> torch.Tensor:
    """Model Breadcrumbs mask: drop the top ``γ`` fraction by magnitude, then the smallest ones.

    Davari & Belilovsky 2024, "Model Breadcrumbs", Sec. 3 (Eq. 1–2): entries are sorted by
    ``|δ|``; the ``⌊γ·n⌋`` largest (outliers) and enough of the smallest are masked so that
    ``⌊density·n⌋`` survive (ascending ranks ``[n_bot, n_bot + ⌊density·n⌋)`` with
    ``n_bot = max(0, n − ⌊density·n⌋ − ⌊γ·n⌋)``; the outlier cut shrinks when needed to reach
    the density). ``density ≥ 1`` returns ``delta`` unchanged.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    mergekit_ties = ((lambda f: torch.sort(f, descending=False).indices[n_bot : n_bot + target])
                     if tie_break == "mergekit" else None)
    mask = rank_window_mask(delta.abs(), n_bot, target, tie_select=mergekit_ties)
    return masked_rescaled(delta, mask, rescale, inplace=inplace)


def random_drop(
    delta: torch.Tensor, density: float, *, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: drop each entry independently with probability ``1 − density``, then rescale.

    Yu et al. 2024, "Language Models are Super Mario" (DARE), Eq. 2: ``m ~ Bernoulli(p)``,
    ``δ̃ = m ⊙ δ``, rescaled (here to the original L1 norm, as mergekit does). The mask is drawn
    by :func:`dare_keep_mask` from ``generator`` — the same draw sequence as mergekit, so equal
    seeds give equal masks. ``density ≥ 1`` returns ``delta``.
    """
    if density >= 1:
        return delta
    return masked_rescaled(delta, dare_keep_mask(delta, density, generator), rescale)


def dare_keep_mask(like: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's keep mask ``m ~ Bernoulli(density)`` shaped and typed like ``like`` (0/1), one
    ``torch.bernoulli`` draw per entry in flat order: the masks of consecutive row blocks drawn
    from one generator are the rows of the whole tensor's mask (the row-block kernels rely on it)."""
    mask = torch.full_like(like, float(density))
    return mask.bernoulli_(mask, generator=generator)  # in place: p → sample, one temporary


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: keep probabilities grow with the magnitude rank inside each row.

    Deep et al. 2024, "DELLA-Merging", Sec. 3.1 (Eq. 1–3): within each row (dim 1; a 1-D tensor
    is one row) entries are ranked by ``|δ|`` (rank ``r ∈ 1..n``, ties by index); the keep
    probability is ``p_r = (density − ε) + 2ε·(r − 1)/(n − 1)`` so ``p`` spans
    ``[density − ε, density + ε]`` with mean ``density``; ``m ~ Bernoulli(p)``; survivors are
    rescaled (mergekit: to the original L1 norm of the whole tensor). Raises ``ConfigError``
    unless ``0 < density − ε`` and ``density + ε < 1``. A row of length 1 gets ``p = density − ε``.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della_range(density, epsilon)
    shape = delta.shape
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    return masked_rescaled(rows, della_keep_mask(rows, density, epsilon, generator), rescale).reshape(shape)


def check_della_range(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities ``density ± ε`` must lie in (0, 1) (:class:`ConfigError` otherwise)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(
            f"della: density ± epsilon must lie in (0, 1), got density={density:g}, epsilon={epsilon:g}",
            "lower epsilon or move density away from 0 and 1",
        )


def della_keep_mask(rows: torch.Tensor, density: float, epsilon: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    """DELLA MagPrune's keep mask of ``rows`` (≥ 2-D; ranks along dim 1): ``m ~ Bernoulli(p_r)``
    with ``p_r = (density − ε) + 2ε·(r − 1)/(n − 1)`` (Deep et al. 2024, Eq. 1–3), float32 0/1.

    Ranks are taken within each row and the draws are made in flat order, so the masks of
    consecutive row blocks drawn from one generator are the rows of the whole tensor's mask."""
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    probs = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    rank_shape = [1] * rows.dim()
    rank_shape[1] = n
    ranks = torch.arange(1, n + 1, dtype=torch.float32, device=rows.device).reshape(rank_shape)
    probs.scatter_(1, order, ranks.expand_as(probs))
    del order
    if n > 1:
        probs.sub_(1.0).div_(float(n - 1)).clamp_(0, 1)
    else:
        probs.zero_()
    probs.mul_(2).mul_(epsilon).add_(density - epsilon)
    return probs.bernoulli_(probs, generator=generator)  # in place: p → sample
