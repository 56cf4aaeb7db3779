"""Tiny models and real PEFT adapters for the safety tests (built once per test session).

* ``base``: a random tiny Llama; ``aligned`` = base + a known seeded perturbation.
* ``ft``: a PEFT LoRA on ``aligned`` (r = 4, α = 8, q/v/up/down, ``init_lora_weights=False``);
  in q/up B is rotated into V's top (layer 1) or bottom (layer 0) left-singular vectors, so ρ spans a wide range.
* ``safety``: rsLoRA, r = 2 (a different rank), q/v/up/down + o_proj (a module ``ft`` lacks).
* ``safety_r4``: plain LoRA of the same rank as ``ft`` (for ``--compat reference``).
* Qwen2 variants (q/k/v biases) of all of the above.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CACHE: dict[str, Any] = {}


@dataclass
class World:
    base: Path
    aligned: Path
    ft: Path
    safety: Path
    safety_r4: Path
    arch: str


def _make_lora(model_dir: Path, out: Path, *, r: int, alpha: float, targets: list[str], seed: int, rslora: bool = False,
               steer_to: Path | None = None, base_dir: Path | None = None) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                     lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    if steer_to is not None:
        # rotate B into V's top (layer 1) or bottom (layer 0) singular directions → high / low ρ
        from safemerge.io.checkpoint import Checkpoint

        al, ba = Checkpoint(model_dir), Checkpoint(base_dir)
        with torch.no_grad():
            for name, mod in pm.named_modules():
                if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}) and name.endswith(("q_proj",
                                                                                                         "up_proj")):
                    w = name.split("base_model.model.", 1)[1] + ".weight"
                    V = al.get(w) - ba.get(w)
                    U, S, _ = torch.linalg.svd(V, full_matrices=True)
                    if ".layers.1." in name:  # top singular directions: high ρ
                        cols = U[:, :r]
                    else:  # mostly the weakest directions (the null space when out > in): low ρ
                        cols = U[:, -r:] + 0.1 * U[:, :r]
                    mod.lora_B["default"].weight.copy_(cols * 0.05)
    pm.save_pretrained(out)
    return out


def build_world(root: Path, arch: str = "llama") -> World:
    """Build (once per session and architecture) the models and adapters described above."""
    key = f"{root}:{arch}"
    if key in _CACHE:
        return _CACHE[key]
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    root = Path(root) / arch
    root.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(arch, seed=0, hidden=32, layers=2)
    base = save_model(model, root / "base")
    perturb_model(model, seed=1, scale=0.02)
    aligned = save_model(model, root / "aligned")
    lin = ["q_proj", "v_proj", "up_proj", "down_proj"]
    ft = _make_lora(aligned, root / "ft", r=4, alpha=8, targets=lin, seed=2, steer_to=aligned, base_dir=base)
    safety = _make_lora(aligned, root / "safety", r=2, alpha=4, targets=lin + ["o_proj"], seed=3, rslora=True)
    safety_r4 = _make_lora(aligned, root / "safety_r4", r=4, alpha=16, targets=lin, seed=4)
    w = World(base, aligned, ft, safety, safety_r4, arch)
    _CACHE[key] = w
    return w


def peft_deltas(model_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """Module path → ΔW as PEFT itself computes it (``get_delta_weight``) after loading the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter_dir)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name.split("base_model.model.", 1)[1]] = mod.get_delta_weight("default").detach().clone()
    return out
