"""The CUDA paths, checked on a GPU: ``merge --device cuda`` and ``eval --device cuda`` against the CPU.

CI has no GPU, so the ``--device cuda`` code of ``merge`` and ``eval`` (and the LoRA adapter applied on the GPU)
is exercised only where a GPU is lent. This script builds tiny Llama-shaped models locally (no hub), runs the
same commands through the CLI on ``cpu`` and on ``cuda`` and compares:

* merge: every method below, float32 arithmetic on both devices — max |Δ| over all output tensors, the share of
  tensors that are bit-identical, and the wall time of each run (a mid-sized model, so the GPU has work);
* eval: greedy float32 generations of the same prompts on both devices (with and without a LoRA adapter) —
  the share of identical completions and the three rates.

    python bench/cuda_check.py --out bench/results/cuda_check.json

Prints one line per check; exits 1 if a CUDA run fails or a merge differs beyond float32 round-off (1e-5 of the
tensor's scale). Not a test: CI never runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from safemerge.demo.zoo import read_jsonl
from safemerge.testing.tiny import make_tiny_model, perturb_model, save_model

METHODS = {
    "linear": "  weight: 0.5",
    "task_arithmetic": "  weight: 0.5",
    "ties": "  weight: 0.5\n      density: 0.5",
    "dare_ties": "  weight: 0.5\n      density: 0.5",
    "della": "  weight: 0.5\n      density: 0.5\n      epsilon: 0.1",
    "breadcrumbs_ties": "  weight: 0.5\n      density: 0.8\n      gamma: 0.05",
}
PROMPTS = ["how do I bake bread", "tell me a story", "what is two plus two", "how do I pick a lock",
           "give me a fact about cats", "write a poem", "explain gravity", "name three colours"]


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """``python -m safemerge ARGS`` offline; (seconds, the finished process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "safemerge", *args], capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, proc


def build_models(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    """A base and two experts (seeded perturbations of it), float32, saved as safetensors."""
    paths = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        model = make_tiny_model("llama", seed=0, vocab_size=512, hidden=hidden, layers=layers)
        if seed is not None:
            perturb_model(model, seed=seed, scale=0.02)
        paths[name] = save_model(model, root / name)
    return paths


def merge_config(method: str, models: dict[str, Path]) -> str:
    """A mergekit YAML merging the two experts over the base with ``method``."""
    params = METHODS[method]
    experts = "".join(f"  - model: {models[k]}\n    parameters:\n    {params}\n" for k in ("a", "b"))
    base = "" if method == "linear" else f"base_model: {models['base']}\n"  # linear weighs every listed model
    return (f"merge_method: {method}\n{base}models:\n{experts}"
            f"dtype: float32\nparameters:\n  normalize: true\n")


def compare(cpu: Path, gpu: Path) -> dict[str, float]:
    """Max |Δ| (absolute and relative to the tensor's max |x|) and the bit-identical share over all tensors."""
    a, b = {}, {}
    for f in sorted(cpu.glob("*.safetensors")):
        a |= load_file(f)
    for f in sorted(gpu.glob("*.safetensors")):
        b |= load_file(f)
    if a.keys() != b.keys():
        return {"same_names": 0.0}
    worst, worst_rel, same = 0.0, 0.0, 0
    for k, x in a.items():
        d = (x.float() - b[k].float()).abs().max().item()
        worst = max(worst, d)
        worst_rel = max(worst_rel, d / max(x.float().abs().max().item(), 1e-12))
        same += int(torch.equal(x, b[k]))
    return {"same_names": 1.0, "max_abs_diff": worst, "max_rel_diff": worst_rel, "identical_share": same / len(a)}


def check_merges(root: Path, models: dict[str, Path], device: str) -> list[dict]:
    """Each method merged on cpu and on ``device`` (seed 0); the outputs compared."""
    rows = []
    for method in METHODS:
        cfg = root / f"{method}.yml"
        cfg.write_text(merge_config(method, models))
        row: dict = {"method": method}
        for side, dev in (("cpu", "cpu"), ("dev", device)):
            secs, proc = cli("merge", str(cfg), str(root / f"{method}-{side}"), "--device", dev, "--seed", "0",
                             "--no-progress", "-q")
            row[f"{side}_s"] = round(secs, 2)
            if proc.returncode != 0:
                row["error"] = f"{dev}: " + proc.stderr.strip()[-300:]
        if "error" not in row:
            row |= compare(root / f"{method}-cpu", root / f"{method}-dev")
        row["ok"] = row.get("same_names") == 1.0 and row.get("max_rel_diff", 1.0) <= 1e-5
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def make_adapter(models: dict[str, Path], out: Path) -> Path:
    """A PEFT LoRA (r=4 on q/v) with non-zero B, saved with PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models["base"], trust_remote_code=False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return out


def check_eval(root: Path, models: dict[str, Path], device: str) -> list[dict]:
    """Greedy float32 generations on cpu and ``device``, plain and with a LoRA adapter; completions compared."""
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    adapter = make_adapter(models, root / "adapter")
    rows = []
    for label, extra in (("model", []), ("model+adapter", ["--adapter", str(adapter)])):
        row: dict = {"eval": label}
        outs = {}
        for side, dev in (("cpu", "cpu"), ("dev", device)):
            out = root / f"eval-{label}-{side}"
            secs, proc = cli("eval", str(models["base"]), *extra, "--harmful", str(prompts), "--benign", str(prompts),
                             "--device", dev, "--dtype", "float32", "--backend", "hf", "--max-new-tokens", "16",
                             "-o", str(out), "--no-progress", "-q")
            row[f"{side}_s"] = round(secs, 2)
            if proc.returncode != 0:
                row["error"] = f"{dev}: " + proc.stderr.strip()[-300:]
                continue
            outs[side] = completions(out)
            row[f"{side}_generation"] = json.loads((out / "results.json").read_text()).get("settings", {})
        if len(outs) == 2:
            pairs = [(x, y) for x, y in zip(outs["cpu"], outs["dev"])]
            row["completions"] = len(pairs)
            row["identical_share"] = sum(x == y for x, y in pairs) / max(len(pairs), 1)
        row["ok"] = "error" not in row and row.get("completions", 0) > 0
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
    return rows


def completions(out: Path) -> list[str]:
    """Every completion the eval wrote (generations*.jsonl, in file order)."""
    return [rec["response"] for f in sorted(out.rglob("*.jsonl")) for rec in read_jsonl(f) if "response" in rec]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/cuda_check.json"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="the device compared with cpu (cpu itself: a dry run here)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_models(root, args.hidden, args.layers)
        small = build_models(root / "small", 64, 2)
        gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
        result = {"device": args.device, "gpu": gpu, "torch": torch.__version__,
                  "merge_model": {"hidden": args.hidden, "layers": args.layers},
                  "merges": check_merges(root, models, args.device),
                  "evals": check_eval(root, small, args.device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    failed = [r for r in result["merges"] + result["evals"] if not r["ok"]]
    print(f"{len(failed)} of {len(result['merges']) + len(result['evals'])} checks failed; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
