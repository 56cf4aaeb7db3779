"""MergeAlign ("Combining Domain and Alignment Vectors … Knowledge-Safety Trade-offs in LLMs",
arXiv 2411.06824; ACL 2025 Short): interpolate the domain vector ``τ_D = θ_domain − θ_pre`` and
the alignment vector ``τ_A = θ_aligned − θ_pre`` and add them back to the pre-trained model::

    θ = θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre)       (MergeAlign)

With ``λ_D + λ_A = 1`` this equals ``λ_D θ_domain + λ_A θ_aligned`` (a weight average of two
models that share the pre-trained parent).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from safemerge.errors import ConfigError


def mergealign_tensor(pre: Any, domain: Any, aligned: Any, *, lambda_domain: float, lambda_aligned: float) -> Any:
    """MergeAlign for one tensor: ``θ_pre + λ_D (θ_D − θ_pre) + λ_A (θ_A − θ_pre)``."""
    return pre + lambda_domain * (domain - pre) + lambda_aligned * (aligned - pre)


def check_lambda(value: Any, flag: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be a number, got {value!r}", "e.g. 0.5") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{flag} must be finite, got {value!r}", "e.g. 0.5")
    return v


def run_mergealign(
    tmp: Path, *, pretrained: Any, domain: Any, aligned: Any, lambda_domain: float, lambda_aligned: float,
    dtype: str | None, allow_pickle: bool, allow_nonfinite: bool, progress: Callable[[str, int, int], None],
) -> None:
    """Stream the pre-trained model's tensors through :func:`mergealign_tensor` into ``tmp`` + model card."""
    from safemerge.io.output import write_model_card
    from safemerge.safety.resta import check_same_tensors, open_ref
    from safemerge.safety.writing import params_markdown, write_full_model, write_json

    ld = check_lambda(lambda_domain, "--lambda-domain")
    la = check_lambda(lambda_aligned, "--lambda-aligned")
    pre = open_ref(pretrained, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="pretrained")
    dom = open_ref(domain, on=pretrained, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="domain")
    al = open_ref(aligned, on=pretrained, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, role="aligned")
    check_same_tensors(pre, [("domain", dom), ("aligned", al)])

    def upd(name: str, t: Any) -> Any:
        return mergealign_tensor(t, dom.get(name), al.get(name), lambda_domain=ld, lambda_aligned=la)

    write_full_model(tmp, pre, upd, dtype=dtype, progress=lambda d, n: progress("write", d, n))
    params = [("method", "MergeAlign (arXiv 2411.06824)"), ("lambda_domain", ld), ("lambda_aligned", la),
              ("pretrained", str(pretrained)), ("domain", str(domain)), ("aligned", str(aligned))]
    write_model_card(tmp, title="MergeAlign model", base_model=str(pretrained), tags=["safemerge", "safety", "mergealign"],
                     front_matter={"safemerge": {"method": "mergealign", "lambda_domain": ld, "lambda_aligned": la}},
                     sections=[("MergeAlign", "θ = θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre).\n\n" + params_markdown(params))])
    write_json(tmp / "safemerge.json", {"method": "mergealign", "lambda_domain": ld, "lambda_aligned": la,
                                        "pretrained": str(pretrained), "domain": str(domain), "aligned": str(aligned)})
