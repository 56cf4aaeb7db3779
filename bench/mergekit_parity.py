"""safemerge vs mergekit-yaml on mergekit's own example configs in their native half precision.

For each example (``safemerge.testing.mergekit_examples``) and dtype (float16, bfloat16): three
tiny perturbed Llama models (``--layers 3``, ``--hidden 32`` by default) are merged by mergekit
0.1.5 (``run_merge``, in-process), by ``safemerge merge`` (default float32 arithmetic) and by
``safemerge merge --mergekit-arithmetic``; prints the largest absolute difference to mergekit and
the share of entries that differ, for both modes, and writes ``bench/results/mergekit_parity.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/mergekit_parity.py [--hidden 64]

The figures are exact comparisons, not timings: they do not depend on machine load.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from safemerge.api import merge  # noqa: E402
from safemerge.options import RunOptions  # noqa: E402
from safemerge.testing import make_tiny_model, perturb_model, save_model  # noqa: E402
from safemerge.testing.mergekit_examples import EXAMPLES  # noqa: E402


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(d / "*.safetensors"))):
        out.update(load_file(f))
    return out


def run_mergekit(text: str, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(copy_tokenizer=False, random_seed=0, quiet=True))
    return load_dir(out)


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Largest |ours − theirs| and number of differing entries (theirs rounded to our dtype)."""
    worst, n_diff = 0.0, 0
    for name, t in theirs.items():
        diff = (ours[name].double() - t.to(ours[name].dtype).double()).abs()
        worst, n_diff = max(worst, float(diff.max())), n_diff + int((diff > 0).sum())
    return worst, n_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mergekit_parity.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mkparity-"))
    zoo = {"base": save_model(make_tiny_model("llama", seed=0, layers=args.layers, hidden=args.hidden), root / "base")}
    for i in (1, 2, 3):
        m = make_tiny_model("llama", seed=0, layers=args.layers, hidden=args.hidden)
        m = perturb_model(m, seed=7 * i, scale=0.03)
        zoo[f"m{i}"] = save_model(m, root / f"m{i}")
    rows = []
    print(f"{'example':28s} {'dtype':9s} {'default max|Δ|':>15s} {'differ':>8s} {'--mergekit-arithmetic':>22s}")
    for example, template in EXAMPLES.items():
        for dtype in ("float16", "bfloat16"):
            work = root / f"{example}-{dtype}"
            work.mkdir()
            text = template.format(dtype=dtype, **{k: str(v) for k, v in zoo.items()})
            (work / "cfg.yml").write_text(text)
            theirs = run_mergekit(text, work / "mk")
            merge(work / "cfg.yml", work / "default", options=RunOptions(progress=False))
            merge(work / "cfg.yml", work / "exact", options=RunOptions(progress=False), mergekit_arithmetic=True)
            total = sum(t.numel() for t in theirs.values())
            d_max, d_n = compare(load_dir(work / "default"), theirs)
            e_max, e_n = compare(load_dir(work / "exact"), theirs)
            rows.append({"example": example, "dtype": dtype, "entries": total, "default_max_abs_diff": d_max,
                         "default_entries_differing": d_n, "mergekit_arithmetic_max_abs_diff": e_max,
                         "mergekit_arithmetic_entries_differing": e_n})
            print(f"{example:28s} {dtype:9s} {d_max:15.3g} {100 * d_n / total:7.2f}% {e_max:14.3g} ({e_n} differ)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hidden": args.hidden, "layers": args.layers, "torch": torch.__version__,
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
