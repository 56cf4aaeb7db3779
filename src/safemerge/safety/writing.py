"""Writing the safety methods' outputs: PEFT adapters, full models streamed tensor by tensor,
model cards that record every parameter and every layer's decision.

All writers work inside a temporary directory from :func:`safemerge.io.output.atomic_output`;
the caller renames it into place only when everything is written.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from safemerge.errors import SafemergeError


def torch_dtype(name: str | None) -> Any:
    """``"bfloat16"`` → ``torch.bfloat16`` (``None`` stays ``None``); unknown names are a user error."""
    if name is None:
        return None
    import torch

    allowed = {"float32", "float16", "bfloat16"}
    n = str(name).replace("torch.", "")
    if n not in allowed:
        raise SafemergeError(f"unsupported --dtype {name!r}", "use float32, float16 or bfloat16")
    return getattr(torch, n)


def write_full_model(
    tmp: Path,
    model: Any,
    update: Callable[[str, Any], Any | None],
    *,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    metadata: dict[str, str] | None = None,
) -> int:
    """Stream every tensor of ``model`` into ``tmp``, replacing those for which ``update`` returns a tensor.

    Args:
        tmp: output directory (temporary).
        model: a Checkpoint (``names()``, ``shape()``, ``dtype_name()``, ``get()``).
        update: ``(tensor_name, float32 tensor) → new float32 tensor`` or ``None`` to keep it.
        dtype: storage dtype (default: each tensor's stored dtype).

    Returns the number of tensors replaced. Config, generation config and tokenizer files are
    copied from the model directory.
    """
    from safemerge.io.output import ShardWriter, copy_model_files

    names = model.names()
    plan = [(n, tuple(model.shape(n))) for n in names]
    dtypes = {}
    for n in names:
        stored = model.dtype_name(n)
        floating = stored.startswith(("float", "bfloat"))
        dtypes[n] = (dtype if (dtype and floating) else stored)
    writer = ShardWriter(tmp, plan=plan, plan_dtypes=dtypes, metadata=metadata)
    changed = 0
    for i, n in enumerate(names):
        t = model.get(n) if dtypes[n].startswith(("float", "bfloat")) else model.get(n, dtype=None)
        new = update(n, t) if t.is_floating_point() else None
        if new is not None:
            changed += 1
            t = new
        writer.add(n, t)
        del t, new
        if progress is not None:
            progress(i + 1, len(names))
    writer.finish()
    src = Path(model.path)
    copy_model_files(src if src.is_dir() else src.parent, tmp)
    return changed


def copy_adapter_side_files(src_dir: Path, tmp: Path) -> None:
    """Copy the tokenizer files that sit next to an adapter (PEFT saves them there)."""
    from safemerge.io.output import TOKENIZER_FILES
    import shutil

    for name in TOKENIZER_FILES:
        f = Path(src_dir) / name
        if f.exists():
            shutil.copyfile(f, tmp / name)


def carried_over_section(parts: dict[str, str]) -> tuple[str, str] | None:
    """Model-card section listing the fine-tuned adapter's non-LoRA parts written unchanged."""
    from safemerge.io.output import md_escape

    if not parts:
        return None
    rows = ["| tensor | part |", "|---|---|"] + [f"| {md_escape(n)} | {md_escape(k)} |" for n, k in parts.items()]
    return ("Carried over unchanged", "The fine-tuned adapter's parameters outside the LoRA product (modules_to_save, "
            "biases, trainable tokens) are the fine-tune's own and lie outside the safety subspace; they were written "
            "unchanged.\n\n" + "\n".join(rows))


def adapter_update_fn(src: Any, lora_update: Callable[[str, Any], Any | None]) -> Callable[[str, Any], Any | None]:
    """Full-model writer update: the fine-tuned adapter's non-LoRA parts, then ``lora_update``.

    ``src`` is the fine-tuned :class:`~safemerge.safety.deltas.DeltaSource`; for an adapter its
    modules_to_save/biases replace the tensor and trainable tokens overwrite their rows before the
    (merged) low-rank update is added, as ``PeftModel.merge_and_unload`` does.
    """
    adapter = getattr(src, "adapter", None)
    if adapter is None:
        return lora_update

    def update(name: str, t: Any) -> Any | None:
        carried = adapter.apply_non_lora(name, t)
        new = lora_update(name, t if carried is None else carried)
        return carried if new is None else new

    return update


def scores_table_markdown(scores: Iterable[Any], *, decision: str = "merged") -> str:
    """Markdown table: module, layer, ρ, ‖ΔW‖_F, decision (one row per layer)."""
    from safemerge.io.output import md_escape

    rows = [f"| module | layer | ρ | ‖ΔW‖_F | {decision} |", "|---|---:|---:|---:|:---:|"]
    for s in scores:
        layer = "" if s.layer is None else str(s.layer)
        rows.append(f"| {md_escape(s.module)} | {layer} | {s.rho:.6f} | {s.delta_norm:.6g} | {'yes' if s.merged else 'no'} |")
    return "\n".join(rows)


def params_markdown(params: Sequence[tuple[str, Any]]) -> str:
    from safemerge.io.output import md_escape

    rows = ["| parameter | value |", "|---|---|"]
    for k, v in params:
        rows.append(f"| {md_escape(k)} | {md_escape(v)} |")
    return "\n".join(rows)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
