"""Fine-tuning updates ΔW per target module, from a LoRA adapter or a full fine-tuned model.

* A PEFT LoRA adapter gives ``ΔW = s·B A`` (Hu et al. 2021, Eq. 3; rsLoRA ``s = α/√r``),
  kept as factors so that every safety computation stays low rank.
* A full fine-tuned model gives the dense ``ΔW = W_ft − W_aligned`` per 2-D weight inside the
  repeated blocks, read one tensor at a time.

Both are matched to the safety subspace **by module path** and validated against the aligned
model's shapes before any arithmetic (a wrong base model is a user error, not a crash).
"""
from __future__ import annotations

from pathlib import Path

import torch

from safemerge.errors import CheckpointError, SafemergeError
from safemerge.io.adapter import load_adapter
from safemerge.io.checkpoint import layer_index
from safemerge.io.hub import resolve_local, split_model_ref
from safemerge.io.references import OpenedModel, open_checkpoint
from safemerge.options import RunOptions
from safemerge.safety.subspace import SafetySubspace


def _matches(module: str, targets: list[str] | None) -> bool:
    """PEFT-style target matching: a target names the last path component(s) of the module."""
    if not targets:
        return True
    return any(module == t or module.endswith("." + t) for t in targets)


class DeltaSource:
    """Common interface: ``modules``, :meth:`dense`, :meth:`lowrank` (``None`` for dense sources)."""

    path: Path
    kind: str
    modules: list[str]

    def dense(self, module: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def lowrank(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def rank(self, module: str) -> int | None:
        return None

    label_override: str | None = None

    @property
    def label(self) -> str:
        """How the input is named in scan output (the directory name, or the full path if ambiguous)."""
        return self.label_override or self.path.name or str(self.path)


class AdapterDeltas(DeltaSource):
    """A LoRA adapter as ``module → (A, s·B)`` with ``ΔW = (s·B) @ A`` in the weight's layout."""

    kind = "adapter"

    def __init__(self, path: str | Path, subspace: SafetySubspace, *, options: RunOptions | None = None,
                 role: str = "adapter") -> None:

        self.path = Path(path)
        self.adapter = load_adapter(self.path, options=options)
        self.adapter.base_model_type = subspace.aligned.config.get("model_type")
        self.role = role
        self.modules = sorted(self.adapter, key=module_sort_key)
        for m in self.modules:
            out_dim, in_dim = subspace.shape(m)
            mod = self.adapter[m]
            want = (int(mod.B.shape[0]), int(mod.A.shape[1]))
            if mod.transpose:
                want = want[::-1]
            if want != (out_dim, in_dim):
                raise CheckpointError(
                    f"{role} {self.path}: module {m} gives ΔW of shape {want} "
                    f"but the model's weight is {(out_dim, in_dim)}",
                    "use the adapter with the model it was trained on (check --aligned)",
                )

    @property
    def transposed(self) -> bool:
        return any(self.adapter[m].transpose for m in self.modules)

    def lowrank(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, s·B)`` in the base weight's orientation (transposed modules are flipped)."""
        mod = self.adapter[module]
        A, sB = mod.scaled_factors()
        if mod.transpose:  # ΔW_stored = (sBA)ᵀ = Aᵀ (sB)ᵀ
            return sB.T.contiguous(), A.T.contiguous()
        return A, sB

    def dense(self, module: str) -> torch.Tensor:
        A, sB = self.lowrank(module)
        return sB @ A

    def rank(self, module: str) -> int:
        return self.adapter.rank_of(module)

    def scaling(self, module: str) -> float:
        return self.adapter[module].scaling


class ModelDeltas(DeltaSource):
    """A full fine-tuned model: ``ΔW = W_ft − W_aligned`` for each 2-D block weight (dense)."""

    kind = "model"

    def __init__(
        self,
        path: str | Path,
        subspace: SafetySubspace,
        *,
        targets: list[str] | None = None,
        options: RunOptions | None = None,
        role: str = "model",
    ) -> None:

        self.path = Path(str(path))
        # a directory, Hub id or MODEL+ADAPTER
        self.ckpt = open_checkpoint(str(path), options=options)
        self.aligned = subspace.aligned
        self.modules = []
        for m in subspace.linear_modules():
            if not _matches(m, targets):
                continue
            w = f"{m}.weight"
            if w not in self.ckpt:
                raise CheckpointError(f"{role} {self.path} has no tensor {w!r}",
                                      "the fine-tuned model must share the aligned model's architecture")
            if tuple(self.ckpt.shape(w)) != tuple(self.aligned.shape(w)):
                raise CheckpointError(
                    f"{w} has shape {tuple(self.ckpt.shape(w))} in {self.path} "
                    f"but {tuple(self.aligned.shape(w))} in the aligned model",
                    "the fine-tuned model must share the aligned model's architecture",
                )
            subspace.weight_name(m)
            self.modules.append(m)
        self.modules.sort(key=module_sort_key)
        if not self.modules:
            raise SafemergeError(f"no target weights found in {self.path}", "check --targets (e.g. q_proj,v_proj)")

    def dense(self, module: str) -> torch.Tensor:
        w = f"{module}.weight"
        return self.ckpt.get(w) - self.aligned.get(w)


def carried_over_parts(src: DeltaSource, model: OpenedModel, *, role: str = "--finetuned") -> dict[str, str]:
    """The fine-tuned adapter's non-LoRA parts, checked so that they can be carried over unchanged.

    ``modules_to_save`` (e.g. ``lm_head``), LoRA biases (``bias="lora_only"``/``"all"``) and
    trainable tokens are the fine-tune's own parameters outside the LoRA product; SafeMERGE and
    SafeLoRA only act on the low-rank updates of the block weights (the safety subspace), so these
    parts are written unchanged. A full 2-D block weight in ``modules_to_save`` would have to be
    scored like a full fine-tune, and a part the written model does not store (``lm_head`` tied to
    the embeddings) cannot be carried: both are refused rather than dropped.

    Args:
        src: the fine-tuned update (a full model has no such parts: ``{}``).
        model: the checkpoint the output is written against (the aligned or ``--merge-into`` model).

    Returns ``base tensor name → description`` for the model card.
    """
    if not isinstance(src, AdapterDeltas):
        return {}

    parts = src.adapter.non_lora_parts()
    stored = set(model.names())
    for name, kind in parts.items():
        if name not in stored:
            raise SafemergeError(
                f"{role} {src.path} changes {name!r} ({kind}), which {model.path} does not store separately "
                "(tied to the embeddings?)", "untie the weights or merge the adapter into a model that stores it",
            )
        if kind.startswith("modules_to_save") and layer_index(name) is not None and len(model.shape(name)) == 2:
            raise SafemergeError(
                f"{role} {src.path} saves the full block weight {name!r} (modules_to_save), which SafeMERGE/SafeLoRA "
                "would have to score as a full fine-tune",
                "merge the adapter into a full model first and pass that model",
            )
    return parts


MODULE_ORDER = {n: i for i, n in enumerate(
    ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"))}


def module_sort_key(module: str) -> tuple:
    """Model order: block index, then q, k, v, o, gate, up, down (others by name)."""

    idx = layer_index(module + ".weight")
    return (idx if idx is not None else -1, MODULE_ORDER.get(module.rsplit(".", 1)[-1], len(MODULE_ORDER)), module)


def open_deltas(
    path: str | Path,
    subspace: SafetySubspace,
    *,
    targets: list[str] | None = None,
    options: RunOptions | None = None,
    role: str = "fine-tuned",
) -> DeltaSource:
    """An adapter directory (``adapter_config.json``), a full model directory, a Hub id of either, or
    ``MODEL+ADAPTER``, as a :class:`DeltaSource`.

    ``ALIGNED+ADAPTER`` (the adapter on the aligned model itself) is the adapter's exact low-rank
    update; ``OTHER+ADAPTER`` is a full model whose delta to the aligned model is taken densely.
    """

    model, adapter = split_model_ref(str(path))
    if adapter is not None:
        on_aligned = resolve_local(model, options=options).resolve() == Path(subspace.aligned.path).resolve()
        if not on_aligned:
            return ModelDeltas(str(path), subspace, targets=targets, options=options, role=role)
    p = resolve_local(adapter if adapter is not None else model, options=options)
    if not p.exists():
        raise SafemergeError(f"{role} path {str(path)!r} does not exist", "check the path")
    if (p / "adapter_config.json").exists():
        src: DeltaSource = AdapterDeltas(p, subspace, options=options, role=role)
        if targets:
            src.modules = [m for m in src.modules if _matches(m, targets)]
        return src
    return ModelDeltas(p, subspace, targets=targets, options=options, role=role)
