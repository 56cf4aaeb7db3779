"""Public Python API of the safety core.

::

    from safemerge.safety import api
    scores = api.scan("base/", "aligned/", ["task-lora/"])   # SafeMERGE's default τ
    res = api.safemerge_adapters(SafeMergeModels(base="base/", aligned="aligned/", finetuned="task-lora/",
                                                 safety="safety-lora/"), "merged/",
                                 settings=SafeMergeSettings(tau=0.35, alpha=0.8))
    api.safelora(base=..., aligned=..., finetuned=..., out=..., mode="number", num_layers=10)
    api.resta(unaligned=..., aligned=..., finetuned=..., out=..., beta=0.5)
    api.mergealign(pretrained=..., domain=..., aligned=..., out=..., lambda_domain=0.5, lambda_aligned=0.5)

Paths are model directories, PEFT adapter directories, or (RESTA/MergeAlign) ``MODEL+ADAPTER``
references. Every function takes the run's :class:`~safemerge.options.RunOptions` as ``options``
(pickles, NaN/Inf, ``force``, ``dtype``, ``seed``). Every writer is atomic (temporary sibling
directory, renamed when complete) and refuses an existing output unless ``options.force``. All
computation is float32; outputs are stored in the input's dtype unless ``options.dtype`` is given.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safemerge.engine.tensorwise import plan_tensorwise
from safemerge.errors import ConfigError, SafemergeError
from safemerge.io.output import atomic_output, check_output_path, write_model_card
from safemerge.io.references import ModelRef, OpenedModel
from safemerge.methods.catalog import get_method
from safemerge.methods.safety_params import (
    MERGEALIGN_LAMBDA_ALIGNED,
    MERGEALIGN_LAMBDA_DOMAIN,
    RESTA_BETA,
    RESTA_DENSITY,
    SAFELORA_NUM_LAYERS,
    SAFELORA_TAU,
    SAFEMERGE_TAU,
)
from safemerge.options import RunOptions, or_default
from safemerge.progress import StageCallback
from safemerge.safety.deltas import AdapterDeltas, DeltaSource, carried_over_parts, open_deltas
from safemerge.safety.full_model import open_ref, write_model
from safemerge.safety.merge_writer import build_layer_update, write_safemerge_output
from safemerge.safety.results import SafeLoRAResult, SafeMergeResult
from safemerge.safety.safelora import run_safelora
from safemerge.safety.scoring import score_sources
from safemerge.safety.selection import LayerScore, mark, select_below
from safemerge.safety.settings import SafeMergeModels, SafeMergeSettings
from safemerge.safety.subspace import SafetySubspace, open_model
from safemerge.safety.writing import params_markdown, torch_dtype, write_json

"""``progress(stage, done, total)``; the CLI turns it into a rich progress bar."""


def _noop(stage: str, done: int, total: int) -> None:  # pragma: no cover - trivial
    return None


def _as_list(x: ModelRef | Sequence[ModelRef]) -> list[ModelRef]:
    if isinstance(x, (str, Path)):
        return [x]
    return list(x)


# --------------------------------------------------------------------------- scan
def scan(
    base: str | Path,
    aligned: str | Path,
    targets: str | Path | Sequence[str | Path],
    *,
    tau: float = SAFEMERGE_TAU.default,
    target_modules: Sequence[str] | None = None,
    options: RunOptions | None = None,
    progress: StageCallback | None = None,
) -> list[LayerScore]:
    """Per-layer safety similarity ρ of one or more fine-tuned adapters/models (SafeLoRA Eq. 2).

    Args:
        base: unaligned base model directory.
        aligned: aligned model directory (the adapters' base).
        targets: adapter directories and/or full fine-tuned model directories; all are scored
            in one pass over the safety vectors.
        tau: SafeMERGE threshold; ``merged`` is set where ``ρ < τ``.
        target_modules: restrict to modules whose path ends in one of these names
            (e.g. ``["q_proj", "v_proj"]``); full models default to every 2-D block weight.
        options: ``allow_pickle``, ``allow_nonfinite`` of the inputs.

    Returns a flat list of :class:`LayerScore` (``source`` names the input), in input order,
    then model order.
    """

    tau = SAFEMERGE_TAU.check(tau, "--tau")
    paths = _as_list(targets)
    if not paths:
        raise SafemergeError("nothing to scan", "pass at least one adapter or fine-tuned model")
    sub = SafetySubspace(base, aligned, options=options)
    tm = list(target_modules) if target_modules else None
    sources = [open_deltas(p, sub, targets=tm, options=options, role="input") for p in paths]
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        for s in sources:
            s.label_override = str(s.path)
    total = len({m for s in sources for m in s.modules})
    if total == 0:
        what = f"--targets {','.join(tm)}" if tm else "the inputs"
        raise SafemergeError(f"{what} match no module to score",
                             "list module names the inputs adapt, e.g. --targets q_proj,v_proj")
    cb = progress or _noop
    done = [0]

    def tick(_m: str) -> None:
        done[0] += 1
        cb("scan", done[0], total)

    per_source = score_sources(sub, sources, on_module=tick)
    out: list[LayerScore] = []
    for scores in per_source:
        mark(scores, select_below(scores, tau, strict=True))
        out.extend(scores)
    return out


# --------------------------------------------------------------------------- SafeMERGE
def safemerge_adapters(
    models: SafeMergeModels,
    out: str | Path,
    *,
    settings: SafeMergeSettings = SafeMergeSettings(),
    merge_into: str | Path | None = None,
    options: RunOptions | None = None,
    evaluate: Callable[[Path], tuple[Any, str]] | None = None,
    progress: StageCallback | None = None,
) -> SafeMergeResult:
    """SafeMERGE (Djuhera et al. 2025): merge the safety update into the layers that drift from safety.

    Layer i becomes ``α ΔW_f + (1−α) ΔW_s`` when ``ρ_i < τ`` and keeps ``ΔW_f`` otherwise
    (see :mod:`safemerge.methods.update_merge` for the strategies and ``compat="reference"``).

    Args:
        models: the unaligned ``base`` and ``aligned`` model directories (the safety subspace), the task
            (``finetuned``) and ``safety`` updates — PEFT adapters trained on ``aligned``, or full fine-tuned
            model directories.
        out: output directory (adapter, or full model with ``merge_into`` / full-model inputs).
        settings: τ (merge where ρ < τ), α (weight of the task update), ``strategy`` (``linear`` |
            ``dare_linear`` | ``ties`` | ``dare_ties``), ``density`` (keep fraction for DARE/TIES), ``compat``
            (``"reference"``: PEFT 0.14 factor-wise mixing, linear only, equal ranks) and the extensions
            ``safety_gain`` g (merged layers get ``α ΔW_f + g(1−α) ΔW_s``; 1: the paper's convex weights) and
            ``min_layer`` (merge only blocks ``≥ min_layer``; 0: every block, the paper), measured on the demo in
            docs/demo.md. Default: the reference code's τ = 0.35, α = 0.8.
        merge_into: write a full model: this model's tensors plus the merged update.
        options: ``seed`` of DARE (per-tensor generators, :mod:`safemerge.methods.seeding`), ``dtype`` of
            the output (default: the inputs'), ``force``, ``allow_pickle``, ``allow_nonfinite``.
        evaluate: optional ``evaluate(out_tmp_dir) -> (results, markdown)``; the markdown goes
            into the model card.
        progress: ``progress(stage, done, total)`` of the scoring and writing stages.

    Returns a :class:`SafeMergeResult`.
    """

    options = or_default(options)
    torch_dtype(options.dtype)
    inputs = (models.base, models.aligned, models.finetuned, models.safety, merge_into)
    check_output_path(out, force=options.force, inputs=inputs)
    cb = progress or _noop

    sub = SafetySubspace(models.base, models.aligned, options=options)
    ft = open_deltas(models.finetuned, sub, role="--finetuned", options=options)
    sf = open_deltas(models.safety, sub, targets=None, role="--safety", options=options)
    target = open_model(merge_into, role="merge-into", options=options) if merge_into is not None else None

    output = _output_kind(ft, sf, target, settings.compat)
    n_mod = len(ft.modules)
    done = [0]

    def tick(_m: str) -> None:
        done[0] += 1
        cb("score", done[0], n_mod)

    scores = score_sources(sub, [ft], on_module=tick)[0]
    mark(scores, select_below(scores, settings.tau, strict=True, min_layer=settings.min_layer))
    merged = {s.module for s in scores if s.merged}
    if settings.compat is not None:
        _check_equal_ranks(ft, sf)

    result = SafeMergeResult.of(Path(out), output, scores, settings, seed=options.seed,
                                ignored_safety_modules=_ignored_safety_parts(ft, sf),
                                carried_over=carried_over_parts(ft, target if target is not None else sub.aligned))
    updates = build_layer_update(ft, sf, merged, settings, seed=options.seed)
    with atomic_output(out, force=options.force, inputs=inputs) as tmp:
        write_safemerge_output(tmp, result, ft, updates, models=models, target=target, aligned=sub.aligned,
                               options=options, progress=cb, evaluate=evaluate)
    return result


def _output_kind(ft: DeltaSource, sf: DeltaSource, target: OpenedModel | None, compat: str | None) -> str:
    """``"adapter"`` (two LoRAs, no ``--merge-into``) or ``"model"``; refuses combinations that cannot be written."""
    both_adapters = isinstance(ft, AdapterDeltas) and isinstance(sf, AdapterDeltas)
    if compat is not None and not both_adapters:
        raise ConfigError("--compat reference needs two LoRA adapters",
                          "pass adapter directories for --finetuned and --safety")
    if target is not None or not isinstance(ft, AdapterDeltas):
        return "model"  # --merge-into, or a full fine-tune: the fine-tuned model with merged layers
    if ft.transposed:
        raise SafemergeError(
            f"{ft.path} has fan_in_fan_out/embedding modules, which cannot be written back as a merged adapter",
            "pass --merge-into MODEL to write a full model instead",
        )
    if not isinstance(sf, AdapterDeltas):
        raise SafemergeError(
            "a full-model --safety update cannot be merged into an adapter",
            "pass --merge-into MODEL (e.g. the aligned model) to write a full model",
        )
    return "adapter"


def _ignored_safety_parts(ft: DeltaSource, sf: DeltaSource) -> list[str]:
    """Safety-update modules the fine-tuned update does not touch, and the safety adapter's non-LoRA parts."""
    ignored = sorted(set(sf.modules) - set(ft.modules))
    if isinstance(sf, AdapterDeltas):
        ignored += [f"{name} ({kind}, not applied)" for name, kind in sf.adapter.non_lora_parts().items()]
    return ignored


def _check_equal_ranks(ft: DeltaSource, sf: DeltaSource) -> None:
    for m in ft.modules:
        if m in sf.modules and ft.rank(m) != sf.rank(m):
            raise SafemergeError(
                f"--compat reference needs adapters of equal rank, but {m} has r_f={ft.rank(m)} and r_s={sf.rank(m)}",
                "PEFT's factor-wise linear merge requires one rank; drop --compat to merge exactly at rank r_f + r_s",
            )


# --------------------------------------------------------------------------- SafeLoRA
def safelora(
    *,
    base: str | Path,
    aligned: str | Path,
    finetuned: str | Path,
    out: str | Path,
    mode: str = "threshold",
    tau: float = SAFELORA_TAU.default,
    num_layers: int = SAFELORA_NUM_LAYERS.default,
    merge_into: str | Path | None = None,
    options: RunOptions | None = None,
    progress: StageCallback | None = None,
) -> SafeLoRAResult:
    """SafeLoRA (Hsu et al., NeurIPS 2024, Eq. 3): project ``B ← C B`` on low-ρ layers.

    ``C B = V (Vᵀ B)/‖V‖_F`` (unnormalised, as published; never an out × out matrix). Layers are
    chosen by ``ρ ≤ τ`` (``mode="threshold"``, τ = 0.5) or as the ``num_layers`` lowest ρ
    (``mode="number"``, K = 10; ties at the K-th value included). Each layer is projected at most
    once (the reference PEFT port's double projection is avoided by projecting from the original
    factors in a single pass). A full fine-tuned model gets ``ΔW ← C ΔW`` on the chosen layers.
    ``options``: ``dtype`` of the output, ``force``, ``allow_pickle``, ``allow_nonfinite``.
    """

    if mode not in ("threshold", "number"):
        raise ConfigError(f"unknown SafeLoRA mode {mode!r}", "use --mode threshold or --mode number")
    options = or_default(options)
    tau = SAFELORA_TAU.check(tau, "--tau")
    torch_dtype(options.dtype)
    with atomic_output(out, force=options.force, inputs=(base, aligned, finetuned, merge_into)) as tmp:
        res = run_safelora(
            tmp, base=base, aligned=aligned, finetuned=finetuned, mode=mode, tau=tau, num_layers=num_layers,
            merge_into=merge_into, options=options, progress=progress or _noop,
        )
    res.out = Path(out)
    return res


# --------------------------------------------------------------------------- RESTA
def resta(
    *,
    unaligned: str | Path,
    aligned: str | Path,
    finetuned: str | Path,
    out: str | Path,
    beta: float = RESTA_BETA.default,
    dare_density: float | None = None,
    options: RunOptions | None = None,
    progress: StageCallback | None = None,
) -> Path:
    """RESTA (Bhardwaj et al., ACL 2024, §3): ``θ = θ_ft + β (θ_aligned − θ_unaligned)``.

    With ``dare_density = p`` the fine-tuning delta is first sparsified by DARE (Yu et al. 2024):
    ``θ = θ_aligned + DARE_p(θ_ft − θ_aligned) + β (θ_aligned − θ_unaligned)``. ``finetuned`` may
    be a full model, a LoRA adapter directory (applied to ``aligned``) or ``MODEL+ADAPTER``.
    Writes a full model (the registered ``resta`` method run by the engine on every tensor of
    ``aligned``; DARE masks drawn per tensor from ``(options.seed, name)``, as ``merge_method: resta``); returns
    its path. ``options``: ``seed``, ``dtype`` of the output, ``force``, ``allow_pickle``, ``allow_nonfinite``.
    """

    options = or_default(options)
    seed = options.seed
    torch_dtype(options.dtype)
    beta = RESTA_BETA.check(beta, "--beta")
    density = None if dare_density is None else RESTA_DENSITY.check(dare_density, "--dare-density")
    with atomic_output(out, force=options.force, inputs=(unaligned, aligned, finetuned)) as tmp:
        ckpts = {"aligned": open_ref(aligned, role="aligned", options=options),
                 "unaligned": open_ref(unaligned, role="unaligned", options=options),
                 "fine-tuned": open_ref(finetuned, on=aligned, role="finetuned", options=options)}
        plan = plan_tensorwise(get_method("resta"), ckpts, reference="aligned", models=["aligned", "fine-tuned"],
                               base="unaligned", params={"beta": beta, "density": density or 1.0},
                               dtype=options.dtype)
        cb = progress or _noop
        write_model(tmp, plan, ckpts, options=options, progress=lambda d, n: cb("write", d, n))
        params = [("method", "RESTA (Bhardwaj et al. 2024)"), ("beta", beta),
                  ("dare density", density if density is not None else "none"), ("seed", seed),
                  ("unaligned", str(unaligned)), ("aligned", str(aligned)), ("fine-tuned", str(finetuned))]
        dare_note = ", with DARE on θ_ft − θ_aligned first" if density is not None and density < 1 else ""
        write_model_card(tmp, title="RESTA re-aligned model", base_model=str(aligned),
                         tags=["safemerge", "safety", "resta"],
                         front_matter={"safemerge": {"method": "resta", "beta": beta, "dare_density": density,
                                                     "seed": seed}},
                         sections=[("RESTA", "θ = θ_ft + β (θ_aligned − θ_unaligned)" + dare_note + ".\n\n"
                                    + params_markdown(params))])
        write_json(tmp / "safemerge.json", {"method": "resta", "beta": beta, "dare_density": density, "seed": seed,
                                            "unaligned": str(unaligned), "aligned": str(aligned),
                                            "finetuned": str(finetuned)})
    return Path(out)


# --------------------------------------------------------------------------- MergeAlign
def mergealign(
    *,
    pretrained: str | Path,
    domain: str | Path,
    aligned: str | Path,
    out: str | Path,
    lambda_domain: float = MERGEALIGN_LAMBDA_DOMAIN.default,
    lambda_aligned: float = MERGEALIGN_LAMBDA_ALIGNED.default,
    options: RunOptions | None = None,
    progress: StageCallback | None = None,
) -> Path:
    """MergeAlign (arXiv 2411.06824): ``θ = θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre)``.

    ``domain`` / ``aligned`` may be full models, adapter directories (applied to ``pretrained``)
    or ``MODEL+ADAPTER`` references. Writes a full model (the registered ``mergealign`` method run
    by the engine on every tensor of ``pretrained``); returns its path. ``options``: ``dtype`` of the output,
    ``force``, ``allow_pickle``, ``allow_nonfinite``.
    """

    options = or_default(options)
    torch_dtype(options.dtype)
    ld = MERGEALIGN_LAMBDA_DOMAIN.check(lambda_domain, "--lambda-domain")
    la = MERGEALIGN_LAMBDA_ALIGNED.check(lambda_aligned, "--lambda-aligned")
    with atomic_output(out, force=options.force, inputs=(pretrained, domain, aligned)) as tmp:
        ckpts = {"pretrained": open_ref(pretrained, role="pretrained", options=options),
                 "domain": open_ref(domain, on=pretrained, role="domain", options=options),
                 "aligned": open_ref(aligned, on=pretrained, role="aligned", options=options)}
        plan = plan_tensorwise(get_method("mergealign"), ckpts, reference="pretrained", models=["aligned", "domain"],
                               base="pretrained", params={"lambda_domain": ld, "lambda_aligned": la},
                               dtype=options.dtype)
        cb = progress or _noop
        write_model(tmp, plan, ckpts, options=options, progress=lambda d, n: cb("write", d, n))
        params = [("method", "MergeAlign (arXiv 2411.06824)"), ("lambda_domain", ld), ("lambda_aligned", la),
                  ("pretrained", str(pretrained)), ("domain", str(domain)), ("aligned", str(aligned))]
        write_model_card(tmp, title="MergeAlign model", base_model=str(pretrained),
                         tags=["safemerge", "safety", "mergealign"],
                         front_matter={"safemerge": {"method": "mergealign", "lambda_domain": ld,
                                                     "lambda_aligned": la}},
                         sections=[("MergeAlign", "θ = θ_pre + λ_D (θ_domain − θ_pre) + λ_A (θ_aligned − θ_pre).\n\n"
                                    + params_markdown(params))])
        write_json(tmp / "safemerge.json", {"method": "mergealign", "lambda_domain": ld, "lambda_aligned": la,
                                            "pretrained": str(pretrained), "domain": str(domain),
                                            "aligned": str(aligned)})
    return Path(out)
