"""RESTA — REstoring Safety through Task Arithmetic (Bhardwaj, Anh & Poria, ACL 2024, arXiv 2402.11746).

The safety vector is ``v = θ_aligned − θ_unaligned`` (§3, where the unaligned twin is made by
fine-tuning the aligned model on harmful data, or is the pre-trained base). A compromised
fine-tuned model is re-aligned by task arithmetic (Ilharco et al. 2023)::

    θ = θ_ft + β · (θ_aligned − θ_unaligned)                          (RESTA, Eq. 1)

optionally after DARE (Yu et al. 2024, Eq. 2) on the fine-tuning delta ``δ = θ_ft − θ_aligned``
(drop each entry with probability 1 − p, rescale the kept ones by 1/p)::

    θ = θ_aligned + DARE_p(δ) + β · (θ_aligned − θ_unaligned)
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from safemerge.errors import CheckpointError, ConfigError


def dare(delta: Any, density: float, generator: Any) -> Any:
    """Drop And REscale (Yu et al. 2024, Eq. 2): keep each entry with probability ``density``, divide by it."""
    import torch

    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def resta_tensor(ft: Any, aligned: Any, unaligned: Any, *, beta: float, density: float | None = None, generator: Any = None) -> Any:
    """RESTA for one tensor (Eq. 1), with optional DARE on ``θ_ft − θ_aligned`` first."""
    if density is None or density >= 1.0:
        return ft + beta * (aligned - unaligned)
    return aligned + dare(ft - aligned, density, generator) + beta * (aligned - unaligned)


def check_beta(beta: Any) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ConfigError(f"--beta must be a number, got {beta!r}", "e.g. --beta 0.5") from None
    if b != b or b in (float("inf"), float("-inf")):
        raise ConfigError(f"--beta must be finite, got {beta!r}", "e.g. --beta 0.5")
    return b


def check_density(density: Any) -> float | None:
    if density is None:
        return None
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ConfigError(f"--dare-density must be a number, got {density!r}", "use a keep fraction in (0, 1], e.g. 0.9") from None
    if not 0.0 < d <= 1.0:
        raise ConfigError(f"--dare-density = {density!r} is outside (0, 1]", "use a keep fraction in (0, 1], e.g. 0.9")
    return d


def open_ref(ref: Any, *, on: Any = None, allow_pickle: bool, allow_nonfinite: bool, role: str) -> Any:
    """A model dir, ``MODEL+ADAPTER``, or an adapter dir applied to ``on`` (a model path)."""
    from safemerge.io.checkpoint import open_checkpoint
    from safemerge.io.hub import resolve_local, split_model_ref

    if split_model_ref(str(ref))[1] is not None:
        return open_checkpoint(str(ref), allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    p = resolve_local(str(ref), allow_pickle=allow_pickle)  # a Hub id becomes its local snapshot
    if (p / "adapter_config.json").exists():
        if on is None:
            raise CheckpointError(f"--{role} {ref} is an adapter", "pass MODEL+ADAPTER")
        return open_checkpoint(f"{on}+{p}", allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    if not p.exists():
        raise CheckpointError(f"--{role} path {str(ref)!r} does not exist", "check the path")
    return open_checkpoint(str(p), allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)


def check_same_tensors(ref: Any, others: list[tuple[str, Any]]) -> None:
    """Every tensor of ``ref`` exists with the same shape in each other checkpoint."""
    for n in ref.names():
        for role, ck in others:
            if n not in ck:
                raise CheckpointError(f"tensor {n!r} of {ref.path} is missing from the {role} model {ck.path}",
                                      "all models must share one architecture")
            if tuple(ck.shape(n)) != tuple(ref.shape(n)):
                raise CheckpointError(f"tensor {n!r} has shape {tuple(ck.shape(n))} in the {role} model but {tuple(ref.shape(n))} in {ref.path}",
                                      "all models must share one architecture (same vocabulary size)")


def run_resta(
    tmp: Path, *, unaligned: Any, aligned: Any, finetuned: Any, beta: float, dare_density: float | None,
    seed: int | None, dtype: str | None, allow_pickle: bool, allow_nonfinite: bool,
    progress: Callable[[str, int, int], None],
) -> None:
    """Stream the fine-tuned model's tensors through :func:`resta_tensor` into ``tmp`` + model card."""
    from safemerge.io.output import write_model_card
    from safemerge.safety.safemerge import layer_generator
    from safemerge.safety.writing import params_markdown, write_full_model, write_json

    beta = check_beta(beta)
    density = check_density(dare_density)
    al = open_ref(aligned, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="aligned")
    un = open_ref(unaligned, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="unaligned")
    ft = open_ref(finetuned, on=aligned, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="finetuned")
    check_same_tensors(al, [("unaligned", un), ("fine-tuned", ft)])

    def upd(name: str, _t: Any) -> Any:
        gen = layer_generator(seed, name) if density is not None and density < 1.0 else None
        return resta_tensor(ft.get(name), al.get(name), un.get(name), beta=beta, density=density, generator=gen)

    write_full_model(tmp, al, upd, dtype=dtype, progress=lambda d, n: progress("write", d, n))
    params = [("method", "RESTA (Bhardwaj et al. 2024)"), ("beta", beta), ("dare density", density if density is not None else "none"),
              ("seed", seed), ("unaligned", str(unaligned)), ("aligned", str(aligned)), ("fine-tuned", str(finetuned))]
    write_model_card(tmp, title="RESTA re-aligned model", base_model=str(aligned), tags=["safemerge", "safety", "resta"],
                     front_matter={"safemerge": {"method": "resta", "beta": beta, "dare_density": density, "seed": seed}},
                     sections=[("RESTA", "θ = θ_ft + β (θ_aligned − θ_unaligned)"
                                + (", with DARE on θ_ft − θ_aligned first" if density is not None and density < 1 else "")
                                + ".\n\n" + params_markdown(params))])
    write_json(tmp / "safemerge.json", {"method": "resta", "beta": beta, "dare_density": density, "seed": seed,
                                        "unaligned": str(unaligned), "aligned": str(aligned), "finetuned": str(finetuned)})
