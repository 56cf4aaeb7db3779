"""The safety subspace: ``V_i = W_aligned,i − W_base,i`` per target weight, streamed.

SafeLoRA (Hsu et al., NeurIPS 2024, arXiv 2405.16833, Eq. 1) calls ``V_i`` the *alignment
matrix* of layer i: the difference between the safety-aligned chat model and its unaligned
base. The reference code zips the two models' ``named_parameters()`` and pairs them with LoRA
layers **by position**; here every target is matched **by module path**
(``model.layers.3.self_attn.q_proj`` ↔ tensor ``model.layers.3.self_attn.q_proj.weight``), and
only 2-D weights are targets (1-D biases such as Qwen2's q/k/v biases are never projected).

Tensors are read lazily from memory-mapped safetensors, one at a time, so the peak memory of
a scan is two weight matrices plus O((out + in)·r) work space.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from safemerge.errors import CheckpointError, SafemergeError
from safemerge.io.checkpoint import layer_index
from safemerge.io.references import ModelRef, OpenedModel, open_checkpoint
from safemerge.options import RunOptions


def open_model(ref: ModelRef | OpenedModel, *, options: RunOptions | None = None, role: str = "model") -> OpenedModel:
    """Open a model directory, Hub id or ``MODEL+ADAPTER`` (or pass a Checkpoint through), naming ``role`` in errors."""
    if hasattr(ref, "get") and hasattr(ref, "shape"):
        return ref

    p = Path(str(ref))
    if (p / "adapter_config.json").exists():
        raise SafemergeError(
            f"--{role} {p} is a LoRA adapter, but a full model is needed here",
            f"pass the model directory for --{role}, or MODEL+ADAPTER (adapters go to the fine-tuned/safety arguments)",
        )
    return open_checkpoint(str(ref), options=options)


@dataclass(frozen=True)
class SafetyVector:
    """``V`` for one target: the aligned − base difference of one weight matrix.

    Attributes:
        module: module path (``model.layers.3.self_attn.q_proj``).
        weight: tensor name (``model.layers.3.self_attn.q_proj.weight``).
        V: float32 tensor, out × in (the weight's own layout).
        norm: ``‖V‖_F``.
    """

    module: str
    weight: str
    V: torch.Tensor
    norm: float


class SafetySubspace:
    """Lazy per-layer safety vectors from a base (unaligned) and an aligned checkpoint.

    Args:
        base: the unaligned / pre-trained model (directory or Checkpoint).
        aligned: the safety-aligned model the adapters were trained on.
        options: ``allow_pickle`` (``.bin`` checkpoints), ``allow_nonfinite``.
    """

    def __init__(self, base: ModelRef | OpenedModel, aligned: ModelRef | OpenedModel, *,
                 options: RunOptions | None = None) -> None:
        self.base = open_model(base, options=options, role="base")
        self.aligned = open_model(aligned, options=options, role="aligned")
        ab, aa = self.base.architecture, self.aligned.architecture
        if ab and aa and ab != aa:
            raise CheckpointError(
                f"architectures differ: the base model {self.base.path} is {ab} "
                f"but the aligned model {self.aligned.path} is {aa}",
                "--base must be the pre-trained model that --aligned was aligned from",
            )

    def weight_name(self, module: str) -> str:
        """The tensor name of ``module``, checked to exist as a 2-D weight of equal shape in both models."""
        w = f"{module}.weight"
        for ckpt, role in ((self.aligned, "aligned"), (self.base, "base")):
            if w not in ckpt:
                raise CheckpointError(
                    f"target module {module!r} has no weight {w!r} in the {role} model {ckpt.path}",
                    "the adapter must target modules of the model it was trained on; check --base/--aligned",
                )
        sa, sb = tuple(self.aligned.shape(w)), tuple(self.base.shape(w))
        if sa != sb:
            raise CheckpointError(
                f"{w} has shape {sb} in the base model but {sa} in the aligned model",
                "--base and --aligned must share one architecture",
            )
        if len(sa) != 2:
            raise CheckpointError(f"{w} is {len(sa)}-D; only 2-D weights have a safety subspace",
                                  "target linear layers only")
        return w

    def shape(self, module: str) -> tuple[int, int]:
        s = self.aligned.shape(self.weight_name(module))
        return int(s[0]), int(s[1])

    def vector(self, module: str) -> SafetyVector:
        """Read ``V = W_aligned − W_base`` for one module (float32)."""
        w = self.weight_name(module)
        V = self.aligned.get(w) - self.base.get(w)
        return SafetyVector(module, w, V, float(torch.linalg.vector_norm(V)))

    def linear_modules(self) -> list[str]:
        """Every 2-D ``*.weight`` inside a repeated block (the candidates for full fine-tunes)."""

        mods = []
        for n in self.aligned.names():
            if n.endswith(".weight") and layer_index(n) is not None and len(self.aligned.shape(n)) == 2:
                mods.append(n[: -len(".weight")])
        return mods
