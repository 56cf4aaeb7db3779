"""mergekit-order kernels: the same formulas as the streaming kernels, evaluated in mergekit's
operation order and in the dtype of the inputs (``safemerge merge --mergekit-arithmetic``).

Why a second evaluation order exists: rounding in float16/bfloat16 depends on the order of the
operations and on the dtype each intermediate is held in. mergekit casts its inputs to the
config's ``dtype`` and runs the task-arithmetic family, SCE, Model Stock, NearSwap, NuSLERP,
Multi-SLERP and passthrough's ``scale`` *in that dtype*, stacking the task vectors and reducing
over the model axis. The default kernels compute in float32 (more accurate) and accumulate one
model at a time (less memory); in half precision the two orders keep different top-k entries
and round differently (measured up to 0.3 on TIES/DELLA, docs/methods.md). These kernels
reproduce mergekit's order so that a half-precision config gives mergekit's bits.

Each function has the registry signature; :data:`KERNELS` maps method names to them.
``arcee_fusion`` is written in mergekit's order to begin with, so its registry function serves
both modes; ``ram``/``ramplus_tl`` keep their stacked form next to the streaming one in ram.py.
``linear`` has no kernel here: mergekit computes it in float32 too, so the engine runs the
float32 kernel and rounds the result to the config dtype, which is mergekit's result bit for
bit. Every kernel keeps N task vectors (mergekit's memory profile), which is the price of the
parity mode.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Callable

import torch

from safemerge.errors import ConfigError
from safemerge.methods._tensor import check_inputs, masked_rescaled, per_model_list
from safemerge.methods.arcee_fusion import arcee_fusion_fn
from safemerge.methods.ram import ram_mergekit_order, ramplus_tl_mergekit_order
from safemerge.methods.task_arithmetic import FAMILY

Kernel = Callable[..., torch.Tensor]


def _cpu_work_dtype(t: torch.Tensor) -> torch.dtype:
    """mergekit draws Bernoulli masks in float32 for float16 on CPU (no half kernel there)."""
    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def _top_k_mask(delta: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """Mask of the entries ranked ``[start, stop)`` by |δ| with mergekit's (float32) argsort."""
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=descending)
    mask[order[start:stop]] = 1
    return mask.reshape_as(delta)


def _della_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
    """DELLA MagPrune keep mask (Deep et al. 2024, Sec. 3.1) with mergekit's rank arithmetic."""
    work = _cpu_work_dtype(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(work) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    return torch.bernoulli(probs, generator=generator).to(work)


def sparsify(delta: torch.Tensor, method: str | None, *, density: float, rescale: bool, gamma: float,
             epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
    """mergekit's ``sparsify`` in the dtype of ``delta`` (see :mod:`safemerge.methods.sparsify`
    for the definitions and papers)."""
    if method is None or density >= 1:
        return delta
    n = delta.numel()
    if method == "magnitude":
        if density <= 0 or n == 0:
            return torch.zeros_like(delta)
        return masked_rescaled(delta, _top_k_mask(delta, 0, max(1, int(density * n)), True), rescale)
    if method == "magnitude_outliers":
        keep = int(density * n)
        bottom = max(0, n - keep - int(gamma * n))
        return masked_rescaled(delta, _top_k_mask(delta, bottom, bottom + keep, False), rescale)
    if density <= 0:
        return torch.zeros_like(delta)
    work = _cpu_work_dtype(delta)
    if method == "random":
        mask = torch.bernoulli(torch.full_like(delta, density, dtype=work), generator=generator)
        return masked_rescaled(delta.to(work), mask, rescale).to(delta.dtype)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(f"della: density ± epsilon must lie in (0, 1), got density={density:g}, epsilon={epsilon:g}",
                          "lower epsilon or move density away from 0 and 1")
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    masked = masked_rescaled(rows.to(work), _della_mask(delta, density, epsilon, generator), rescale)
    return masked.to(delta.dtype).reshape(delta.shape)


def _elect(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election (Yadav et al. 2023, Sec. 3) as mergekit's ``get_mask(method="sum")``."""
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return sign == majority


def task_arithmetic_family(name: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *,
                           per_model: dict[str, list[Any]], params: dict[str, Any],
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """θ₀ + λ·merge(wᵢ·sparsify(θᵢ − θ₀)) (Ilharco et al. 2023, Eq. 1; TIES, DARE, Breadcrumbs,
    DELLA) with the task vectors stacked and reduced over the model axis, as mergekit does."""
    sparsification, consensus, normalize_default, rescale_default = FAMILY[name]
    check_inputs(name, tensors, base, base_policy="required", min_models=0, max_models=None)
    assert base is not None
    n = len(tensors)
    if n == 0:
        return base
    weights_list = per_model_list(name, per_model, "weight", n)
    rescale = bool(params.get("rescale", rescale_default))
    deltas = base.new_empty((n, *base.shape))
    for i, t in enumerate(tensors):
        deltas[i] = sparsify(
            t - base, sparsification, density=float((per_model.get("density") or [1.0] * n)[i]), rescale=rescale,
            gamma=float((per_model.get("gamma") or [0.01] * n)[i]),
            epsilon=float((per_model.get("epsilon") or [0.15] * n)[i]), generator=generator,
        )
    weights = torch.tensor([float(w) for w in weights_list], dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape((n,) + (1,) * base.dim())
    deltas.mul_(weights)
    if consensus:
        mask = _elect(deltas)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if bool(params.get("normalize", normalize_default)):
        mixed /= divisor
    lam = float(params.get("lambda", 1.0))
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def nearswap(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
             params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """NearSwap ``w·θ₁ + (1 − w)·θ₀``, ``w = clamp(t/max(|θ₀ − θ₁|, 1e-6), 0, 1)``, in the input
    dtype."""
    check_inputs("nearswap", tensors, base, base_policy="required", min_models=1, max_models=1)
    assert base is not None
    other = tensors[0]
    weight = (float(params["t"]) / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def model_stock(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
                params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, Sec. 3): ``t·θ_avg + (1 − t)·θ₀``, in the input dtype."""
    check_inputs("model_stock", tensors, base, base_policy="required", min_models=2, max_models=None)
    assert base is not None
    if params.get("filter_wise", False):
        view = (lambda x: x.unsqueeze(0)) if base.dim() == 1 else (lambda x: x)
    else:
        view = lambda x: x.reshape(-1)  # noqa: E731
    w0, ws = view(base), [view(t) for t in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(base.shape)


def sce(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
        params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """SCE (Wan et al. 2024, FuseChat, Sec. 3.3) with the task vectors stacked, in the input dtype."""
    check_inputs("sce", tensors, base, base_policy="required", min_models=0, max_models=None)
    assert base is not None
    if not tensors:
        return base
    deltas = torch.stack([t - base for t in tensors], dim=0)
    topk = float(params.get("select_topk", 1.0))
    if topk < 1:
        var = torch.var(deltas, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        mask = torch.zeros_like(var)
        if k > 0:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        deltas = deltas * mask.unsqueeze(0)
    erase = _elect(deltas)
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    eta = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    eta = eta.reshape((-1,) + (1,) * (deltas.dim() - 1)) * erase
    return base + (deltas * eta).sum(dim=0) / torch.sum(eta, dim=0).clamp(min=1e-6)


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int, flatten: bool,
             eps: float = 1e-8) -> torch.Tensor:
    """Slices of ``v0``, ``v1`` spherically interpolated (Shoemake 1985), mergekit's nuslerp order."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
            params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """NuSLERP with ``t = w₂/(w₁ + w₂)`` on the raw weights or on task vectors, in the input dtype."""
    check_inputs("nuslerp", tensors, base, base_policy="optional", min_models=2, max_models=2)
    w = per_model_list("nuslerp", per_model, "weight", 2)
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    kw = {"dim": 0 if params.get("nuslerp_row_wise", False) else -1,
          "flatten": bool(params.get("nuslerp_flatten", True))}
    if base is None:
        return _nuslerp(t, tensors[0], tensors[1], **kw)
    return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, **kw)


_SLERP_CHUNK = 1 << 20


def slerp(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
          params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """SLERP (Shoemake 1985) as mergekit evaluates it: float32 norms and dot product summed over
    chunks of 2²⁰ entries (the default kernel accumulates in float64), stored in the input dtype."""
    check_inputs("slerp", tensors, base, base_policy="required", min_models=1, max_models=1)
    assert base is not None
    wide = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.reshape(1, -1), tensors[0].reshape(1, -1)
    t = torch.tensor([[float(params["t"])]], dtype=wide)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(base.shape).to(base.dtype)
    chunks = [slice(i, i + _SLERP_CHUNK) for i in range(0, a.shape[1], _SLERP_CHUNK)]

    def norm(x: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([torch.linalg.vector_norm(x[:, c].to(wide), dim=1, keepdim=True) for c in chunks])
        n = torch.linalg.vector_norm(parts, dim=0)
        return torch.where(n > 1e-8, n, 1)

    na, nb = norm(a), norm(b)
    dot = torch.stack([((a[:, c].to(wide) / na) * (b[:, c].to(wide) / nb)).sum(dim=1, keepdim=True) for c in chunks])
    dot = dot.sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
    coef_b = torch.where(linear, t, torch.sin(t * theta) / torch.sin(theta))
    out = torch.empty_like(a)
    for c in chunks:
        out[:, c] = coef_a * a[:, c].to(wide) + coef_b * b[:, c].to(wide)
    return out.reshape(base.shape)


def multislerp(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
               params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-SLERP (Goddard 2025; Buss & Fillmore 2001) in mergekit's order, in the input dtype:
    tangent-space average at the normalised weighted mean, mapped back with exp, times Σ wᵢ‖vᵢ‖."""
    check_inputs("multislerp", tensors, base, base_policy="optional", min_models=1, max_models=None)
    if len(tensors) == 1:
        return tensors[0]
    eps = float(params.get("eps", 1e-8))
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor([float(w) for w in per_model_list("multislerp", per_model, "weight", len(tensors))],
                           dtype=stacked.dtype, device=stacked.device)
    if params.get("normalize_weights", True):
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ConfigError("multislerp: the weighted directions cancel out (antipodal inputs)",
                              "change the weights or drop one of the opposing models")
        out = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return out + base if base is not None else out


def karcher(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
            params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Karcher mean on the sphere (Karcher 1977; Buss & Fillmore 2001 fixed point) as mergekit
    evaluates it: norms in float32, unit vectors, tangents and iterates in the input dtype."""
    check_inputs("karcher", tensors, None, base_policy="none", min_models=1, max_models=None)
    if len(tensors) == 1:
        return tensors[0]
    max_iter, tol = int(params.get("max_iter", 10)), float(params.get("tol", 1e-5))
    wide = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(t.to(wide)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [u for u, n in zip(units, norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    weights = [alpha / sum([alpha] * len(valid))] * len(valid)  # mergekit's Python-float normalisation
    mean = torch.zeros_like(valid[0])
    for w, u in zip(weights, valid):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean.to(wide))
    mean = valid[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, valid):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(wide))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(wide))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * n for n in norms) * mean


def passthrough(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, per_model: dict[str, list[Any]],
                params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
    """Passthrough: the single input times its optional ``scale``, in the input dtype."""
    check_inputs("passthrough", tensors, None, base_policy="none", min_models=1, max_models=1)
    scale = (per_model.get("scale") or [None])[0]
    return tensors[0].clone() if scale is None else tensors[0] * float(scale)


KERNELS: dict[str, Kernel] = {
    **{name: partial(task_arithmetic_family, name) for name in FAMILY},
    "nearswap": nearswap,
    "model_stock": model_stock,
    "sce": sce,
    "nuslerp": nuslerp,
    "passthrough": passthrough,
    "slerp": slerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "arcee_fusion": arcee_fusion_fn,
    "ram": ram_mergekit_order,
    "ramplus_tl": ramplus_tl_mergekit_order,
}
"""Method name → mergekit-order kernel."""
