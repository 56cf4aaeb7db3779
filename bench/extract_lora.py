"""Benchmark: ``safemerge extract-lora`` vs ``mergekit-extract-lora`` on SmolLM2-135M shapes.

A random-init Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, intermediate 1536, 9 heads,
3 kv heads, vocab 49152; float32 safetensors) is the base; the "fine-tune" adds a known rank-8
update ``B₀A₀`` to every linear weight (210 modules) and to the embeddings. Both tools extract at
``--max-rank 8`` (the true rank: the reconstruction must be exact to float precision) and at 64.
Each run is a fresh subprocess; reported: wall time, peak RSS of the process, the max relative
reconstruction error safemerge reports, and the max |W_merged − W_ft| of PEFT's
``merge_and_unload`` of safemerge's adapter (checked at rank 8).

Run:  .venv/bin/python bench/extract_lora.py              (30 layers; mergekit's run dominates)
      .venv/bin/python bench/extract_lora.py --layers 4   (quick check)
Writes bench/results/extract_lora.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
RANK = 8


def build_models(root: Path, layers: int) -> tuple[Path, Path]:
    import torch
    import transformers as tf

    from safemerge.testing import build_tokenizer

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    tok = build_tokenizer(vocab_size=128)
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and mod is not model.lm_head:
                rows, cols = mod.weight.shape
                mod.weight.add_((torch.randn(rows, RANK, generator=g) * 0.02) @ (torch.randn(RANK, cols,
                                                                                             generator=g) * 0.02))
    ft = root / "ft"
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    return base, ft


# runs the command in a fresh wrapper process, whose RUSAGE_CHILDREN is that command's alone
_WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run(cmd: list[str]) -> dict[str, float]:
    """Wall time and peak RSS (MB) of one command."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"seconds": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024)}


def peft_check(base: Path, ft: Path, adapter: Path) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from safemerge.io.checkpoint import Checkpoint

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = pm.merge_and_unload().state_dict()
    want = Checkpoint(ft)
    return max(float((merged[n] - want.get(n)).abs().max()) for n in want.names())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="number of blocks (SmolLM2-135M has 30)")
    args = ap.parse_args()
    exe = Path(sys.executable).parent
    results: dict[str, object] = {"shapes": f"SmolLM2-135M, {args.layers} layers (random init, float32)",
                                  "true_rank": RANK, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base, ft = build_models(root, args.layers)
        print(f"built base and rank-{RANK} fine-tune in {time.perf_counter() - t0:.1f} s", flush=True)
        for rank in (RANK, 64):
            ours = root / f"ours-r{rank}"
            r = run([str(exe / "safemerge"), "extract-lora", str(ft), "--base", str(base), "-o", str(ours),
                     "--max-rank", str(rank), "-q"])
            card = json.loads((ours / "extract_lora.json").read_text())
            r["max_relative_error"] = card["max_relative_error"]
            r["adapter_mb"] = round(sum(f.stat().st_size for f in ours.iterdir()) / 1e6, 1)
            if rank == RANK:
                r["peft_merge_max_abs_diff"] = peft_check(base, ft, ours)
            results["runs"][f"safemerge r={rank}"] = r
            print(f"safemerge extract-lora r={rank}: {r}", flush=True)
            mk = exe / "mergekit-extract-lora"
            if mk.exists():
                m = run([str(mk), "--model", str(ft), "--base-model", str(base), "--out-path",
                         str(root / f"mk-r{rank}"),
                         "--max-rank", str(rank)])
                results["runs"][f"mergekit r={rank}"] = m
                print(f"mergekit-extract-lora r={rank}: {m}", flush=True)
            shutil.rmtree(ours, ignore_errors=True)
    out = HERE / "results" / "extract_lora.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
