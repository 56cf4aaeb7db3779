"""Public Python API for merging: :func:`merge` (to disk) and :func:`merge_in_memory`.

The CLI's ``safemerge merge`` is a thin wrapper around :func:`merge`.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safemerge.config import load_config
from safemerge.engine.plan import plan_merge
from safemerge.engine.run import (
    merge_in_memory,  # noqa: F401  (re-exported)
    open_all,
)
from safemerge.engine.tensorwise import write_plan
from safemerge.errors import ConfigError
from safemerge.io.output import atomic_output, check_output_path, copy_model_files, md_escape, write_model_card
from safemerge.options import RunOptions, or_default

_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": _CHATML}

LOG = logging.getLogger("safemerge")

MERGEKIT_CONFIG_NAME = "mergekit_config.yml"
"""The config written next to a merged model: mergekit's file name (model cards, the Hub and
mergekit's own tools look for it), holding the user's YAML text verbatim, comments included."""


def parse_size(text: str | int | float) -> int:
    """Parse ``5GB``, ``500MB``, ``2G``, ``1B`` (billion, mergekit style) or a plain byte count."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = [("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("T", 10**12), ("G", 10**9), ("M", 10**6),
             ("K", 10**3), ("B", 10**9)]
    for suf, mul in units:
        if s.endswith(suf):
            num = s[: -len(suf)]
            break
    else:
        num, mul = s, 1
    try:
        val = float(num)
    except ValueError:
        raise ConfigError(f"cannot parse size {text!r}", "use e.g. 5GB, 500MB or a number of bytes") from None
    if val <= 0:
        raise ConfigError(f"size must be positive, got {text!r}", "use e.g. 5GB")
    return int(val * mul)


def _model_dir(ckpt: Any) -> Path:
    p = Path(ckpt.path)
    return p if p.is_dir() else p.parent


def _read_template(model_dir: Path) -> str | None:
    f = model_dir / "chat_template.jinja"
    if f.exists():
        return f.read_text()
    tc = model_dir / "tokenizer_config.json"
    if tc.exists():
        try:
            t = json.loads(tc.read_text()).get("chat_template")
        except ValueError:
            return None
        return t if isinstance(t, str) else None
    return None


def _apply_chat_template(setting: str, out: Path, model_dirs: list[Path]) -> None:
    if setting == "auto":
        counts: dict[str, int] = {}
        for d in model_dirs:
            t = _read_template(d)
            if t:
                counts[t] = counts.get(t, 0) + 1
        if not counts:
            return
        template = max(counts, key=lambda k: counts[k])
    elif setting in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[setting]
    elif "{{" in setting or "{%" in setting:
        template = setting
    else:
        raise ConfigError(f"unknown chat_template {setting!r}",
                          f"use 'auto', one of {sorted(BUILTIN_TEMPLATES)} or a Jinja template string")
    (out / "chat_template.jinja").write_text(template)
    tc = out / "tokenizer_config.json"
    if tc.exists():
        data = json.loads(tc.read_text())
        if "chat_template" in data:
            data.pop("chat_template")
            tc.write_text(json.dumps(data, indent=2) + "\n")


def _fence(text: str) -> str:
    run = max((len(r) for r in __import__("re").findall(r"`+", text)), default=0)
    f = "`" * max(3, run + 1)
    return f"{f}yaml\n{text.rstrip()}\n{f}"


def _config_updates(plan: Any, ckpts: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` changes of the merged model: layer count, vocabulary size, and its one storage dtype."""
    updates = dict(plan.config_updates)
    float_dtypes = {j.out_dtype for j in plan.jobs if not j.passthrough}
    if len(float_dtypes) == 1:
        ref_cfg = ckpts[plan.reference].config
        for k in [k for k in ("dtype", "torch_dtype") if k in ref_cfg] or ["dtype"]:
            updates[k] = next(iter(float_dtypes))
    return updates


def _card_sections(cfg: Any, plan: Any, seed: int) -> list[tuple[str, str]]:
    """The merged model's card: method and paper, the models, the configuration verbatim."""

    lines = [f"- {md_escape(m)}" + (" (base)" if m == cfg.base_model else "") for m in cfg.referenced_models()]
    reference = f" — {md_escape(plan.method.reference)}" if plan.method.reference else ""
    return [
        ("Merge details", f"Merged with safemerge using **{md_escape(plan.method.name)}**{reference}."
         f"\n\nSeed: {seed}. Output layers: {plan.num_layers}."),
        ("Models merged", "\n".join(lines)),
        ("Configuration", _fence(cfg.source_text)),
    ]



def _input_paths(cfg: Any, config: Any) -> list[Any]:
    """Everything a merge reads, which its output may neither replace nor lie in: the models, a tokenizer source
    model and the config file (``None`` where there is none)."""
    tok_ref = cfg.effective_tokenizer_source
    return [*cfg.referenced_models(), tok_ref if tok_ref not in ("base", "union") else None,
            config if isinstance(config, (str, Path)) and "\n" not in str(config) else None]


def _check_device(device: str) -> None:
    """A CUDA device asked for must exist (checked before any model is opened)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA device is available", "use --device cpu")


def _write_model_files(tmp: Path, cfg: Any, plan: Any, ckpts: Mapping[str, Any], *, copy_tokenizer: bool) -> None:
    """Everything of the output but the weights and the card: ``config.json`` (and the reference model's other
    files), the tokenizer, the chat template and the merge config (``mergekit_config.yml``)."""
    # a re-indexed vocabulary comes with its own tokenizer, saved whatever --copy-tokenizer says (as mergekit)
    copy_model_files(_model_dir(ckpts[plan.reference]), tmp, config_updates=_config_updates(plan, ckpts),
                     copy_tokenizer=copy_tokenizer and plan.vocab is None)
    if plan.vocab is not None:
        plan.vocab.tokenizer.save_pretrained(str(tmp))
    if cfg.chat_template:
        _apply_chat_template(cfg.chat_template, tmp, [_model_dir(c) for c in ckpts.values()])
    (tmp / MERGEKIT_CONFIG_NAME).write_text(cfg.source_text)


def merge(
    config: Any,
    out_dir: str | Path,
    *,
    options: RunOptions | None = None,
    out_shard_size: int | str = 5_000_000_000,
    copy_tokenizer: bool = True,
    checkpoints: Mapping[str, Any] | None = None,
    extra_card_sections: Callable[[Path], list[tuple[str, str]]] | None = None,
    mergekit_tie_break: bool = False,
    mergekit_arithmetic: bool = False,
    allow_crimes: bool = False,
) -> Path:
    """Run a merge described by a mergekit-compatible config and write a Hugging Face model.

    Args:
        config: YAML path, YAML text, dict or :class:`~safemerge.config.MergeConfig`.
        out_dir: output directory (written atomically; refused if it exists unless ``options.force``).
        options: the run's :class:`~safemerge.options.RunOptions` — ``seed`` of stochastic methods (DARE,
            DELLA; outputs are byte-identical per seed), ``threads`` (reading, computing and writing
            overlap; default one per CPU), ``device`` of the arithmetic, ``allow_pickle``,
            ``allow_nonfinite``, ``force``, ``progress``. The config's ``dtype`` decides the output dtype.
        out_shard_size: maximum shard size (bytes or ``"5GB"``).
        extra_card_sections: called with the finished temporary directory; returns extra
            ``(heading, markdown)`` sections for the model card (e.g. an evaluation report).
        mergekit_tie_break: at top-k cut-offs with exactly equal magnitudes, keep the entries
            mergekit keeps (bit-identical output; slower on tensors with such ties).
        mergekit_arithmetic: compute in the config's ``dtype`` in mergekit's operation order
            (float16/bfloat16 configs give mergekit's bits; implies ``mergekit_tie_break``)
            instead of float32. Slower and holds N task vectors per tensor.
        allow_crimes: merge inputs whose ``config.json`` names different architectures.
        copy_tokenizer: copy the tokenizer files (from the base, or ``tokenizer_source``).

    Returns:
        The output path.
    """

    options = or_default(options)
    cfg = load_config(config)
    inputs = _input_paths(cfg, config)
    check_output_path(out_dir, force=options.force, inputs=inputs)
    _check_device(options.device)
    max_shard = parse_size(out_shard_size)
    ckpts = open_all(cfg, options=options, checkpoints=checkpoints)
    plan = plan_merge(cfg, ckpts, allow_crimes=allow_crimes)
    plan.mergekit_arithmetic = mergekit_arithmetic
    plan.tie_break = "mergekit" if mergekit_tie_break or mergekit_arithmetic else "index"
    LOG.info(
        "plan: %s, %d tensors, %d layers, %.1f MB; arithmetic: %s",
        plan.method.name, len(plan.jobs), plan.num_layers, plan.total_bytes / 1e6,
        f"{plan.compute_dtype or 'input dtype'} (mergekit order)" if mergekit_arithmetic else "float32",
    )
    with atomic_output(out_dir, force=options.force, inputs=inputs) as tmp:
        write_plan(tmp, plan, ckpts, options=options, max_shard_bytes=max_shard, metadata={"producer": "safemerge"})
        _write_model_files(tmp, cfg, plan, ckpts, copy_tokenizer=copy_tokenizer)
        sections = _card_sections(cfg, plan, options.seed)
        if extra_card_sections is not None:
            sections += list(extra_card_sections(tmp))
        write_model_card(
            tmp,
            title=f"Merged model ({plan.method.name})",
            base_model=cfg.base_model,
            tags=("safemerge", "merge"),
            front_matter={"merge_method": plan.method.name, "seed": options.seed},
            sections=sections,
        )
    return Path(out_dir)
