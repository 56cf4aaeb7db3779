"""mergekit parity beyond float32: mergekit's own example configs in their native float16 /
bfloat16, run through ``mergekit-yaml`` (in-process ``run_merge``) and ``safemerge merge``.

* ``--mergekit-arithmetic``: the same bits as mergekit, tensor for tensor.
* default (float32 arithmetic, rounded once to the output dtype): differences bounded by the
  figures documented in docs/methods.md ("What "same tensors" means").

The configs are mergekit's ``examples/*.yml`` (ties.yml, bio-merge.yml, linear.yml,
gradient-slerp.yml, orcamini-platy-44layer.yml, arcee_fusion.yml) with only the model paths
changed to tiny local Llama models.
"""
from __future__ import annotations

import glob
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from safetensors.torch import load_file  # noqa: E402

from safemerge.api import merge  # noqa: E402
from safemerge.options import RunOptions  # noqa: E402
from safemerge.testing import make_tiny_model, perturb_model, save_model  # noqa: E402
from safemerge.testing.mergekit_examples import EXAMPLES  # noqa: E402

# Largest |safemerge − mergekit| in the default (float32) mode on these tiny models, as measured
# and reported in docs/methods.md, rounded up (the tests bound it; they do not pin it). Zero
# where the default mode already gives mergekit's bits (linear and passthrough compute in float32
# in mergekit too). TIES differs because mergekit's float16 task vectors change which entries
# survive the top-k trim and the sign election; arcee_fusion because the rounded importance
# scores move its threshold.
DEFAULT_MODE_MAX_DIFF = {
    ("ties.yml", "float16"): 0.025, ("ties.yml", "bfloat16"): 0.13,
    ("bio-merge.yml", "float16"): 0.032, ("bio-merge.yml", "bfloat16"): 0.043,
    ("linear.yml", "float16"): 0.0, ("linear.yml", "bfloat16"): 0.0,
    ("gradient-slerp.yml", "float16"): 1e-4, ("gradient-slerp.yml", "bfloat16"): 1e-3,
    ("orcamini-platy-44layer.yml", "float16"): 0.0, ("orcamini-platy-44layer.yml", "bfloat16"): 0.0,
    ("arcee_fusion.yml", "float16"): 0.15, ("arcee_fusion.yml", "bfloat16"): 0.19,
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity_zoo")
    paths = {"base": save_model(make_tiny_model("llama", seed=0, layers=3), root / "base")}
    for i in (1, 2, 3):
        model = perturb_model(make_tiny_model("llama", seed=0, layers=3), seed=7 * i, scale=0.03)
        paths[f"m{i}"] = save_model(model, root / f"m{i}")
    return paths


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(d / "*.safetensors"))):
        out.update(load_file(f))
    return out


def _run_mergekit(yaml_text: str, out: Path) -> dict[str, torch.Tensor]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, random_seed=0, quiet=True))
    return _load_dir(out)


def _max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    return max(float((ours[n].double() - t.double()).abs().max()) for n, t in theirs.items())


CASES = [(name, dtype) for name in EXAMPLES for dtype in ("float16", "bfloat16")]


@pytest.mark.parametrize("example,dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_mergekit_examples_in_native_dtype(zoo, tmp_path: Path, example: str, dtype: str) -> None:
    yaml_text = EXAMPLES[example].format(dtype=dtype, **{k: str(v) for k, v in zoo.items()})
    (tmp_path / "cfg.yml").write_text(yaml_text)
    theirs = _run_mergekit(yaml_text, tmp_path / "mk")
    merge(tmp_path / "cfg.yml", tmp_path / "exact", options=RunOptions(progress=False, threads=2),
          mergekit_arithmetic=True)
    merge(tmp_path / "cfg.yml", tmp_path / "default", options=RunOptions(progress=False, threads=2))
    exact, default = _load_dir(tmp_path / "exact"), _load_dir(tmp_path / "default")
    assert set(exact) == set(theirs) == set(default)
    for name, t in theirs.items():
        assert exact[name].dtype == default[name].dtype == getattr(torch, dtype), name
        # (mergekit stores arcee_fusion's float32 type-promoted result as is; we store the config dtype)
        assert torch.equal(exact[name], t.to(exact[name].dtype)), f"{example} {dtype} {name}: not mergekit's bits"
    assert _max_diff(default, theirs) <= DEFAULT_MODE_MAX_DIFF[example, dtype]


def test_default_mode_is_closer_to_float64_than_mergekit(zoo, tmp_path: Path) -> None:
    """Why float32 stays the default: on ties.yml in float16 the default output is closer to the
    exact (float64) merge of the same float16-rounded inputs than mergekit's float16 arithmetic."""
    yaml_text = EXAMPLES["bio-merge.yml"].format(dtype="float16", **{k: str(v) for k, v in zoo.items()})
    (tmp_path / "cfg.yml").write_text(yaml_text)
    (tmp_path / "cfg64.yml").write_text(yaml_text.replace("dtype: float16", "dtype: float64"))
    merge(tmp_path / "cfg.yml", tmp_path / "exact", options=RunOptions(progress=False), mergekit_arithmetic=True)
    merge(tmp_path / "cfg.yml", tmp_path / "default", options=RunOptions(progress=False))
    # float16-rounded inputs merged in float64 with float64 arithmetic: the reference
    for m in ("base", "m1", "m2"):
        sd = {k: v.half().double() for k, v in _load_dir(zoo[m]).items()}
        from safetensors.torch import save_file

        d = tmp_path / f"{m}64"
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text((zoo[m] / "config.json").read_text())
        yaml_text = yaml_text.replace(str(zoo[m]), str(d))
    (tmp_path / "cfg64.yml").write_text(yaml_text.replace("dtype: float16", "dtype: float64"))
    merge(tmp_path / "cfg64.yml", tmp_path / "ref", options=RunOptions(progress=False), mergekit_arithmetic=True)
    ref = _load_dir(tmp_path / "ref")
    err = {k: _max_diff(_load_dir(tmp_path / k), ref) for k in ("exact", "default")}
    assert err["default"] <= err["exact"]


# ------------------------------------------------------------------ config and flags

def _cli(*args: str, script: str = "safemerge") -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / script
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_mergekit_yaml_flags_and_script(zoo, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yml"
    template = EXAMPLES["bio-merge.yml"].replace("merge_method: ties", "merge_method: dare_ties")
    cfg.write_text(template.format(dtype="float16", **{k: str(v) for k, v in zoo.items()}))
    flags = ["--random-seed", "3", "--no-copy-tokenizer", "--lazy-unpickle", "--lora-merge-cache",
             str(tmp_path / "cache"), "--allow-crimes", "-v", "--no-progress"]
    r = _cli(str(cfg), str(tmp_path / "a"), *flags, script="safemerge-yaml")
    assert r.returncode == 0, r.stderr
    assert "plan: dare_ties" in r.stderr  # -v
    assert not (tmp_path / "a" / "tokenizer.json").exists() and not (tmp_path / "cache").exists()
    r = _cli("merge", str(cfg), str(tmp_path / "b"), "--seed", "3", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "tokenizer.json").exists()  # --copy-tokenizer is the default
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    r = _cli("merge", str(cfg), str(tmp_path / "c"), "--random-seed", "4", "--no-progress")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "b" / "model.safetensors").read_bytes()
    if not torch.cuda.is_available():
        r = _cli("merge", str(cfg), str(tmp_path / "d"), "--cuda")
        assert r.returncode == 2 and "no CUDA device" in r.stderr and not (tmp_path / "d").exists()


def test_mergekit_config_yml_keeps_the_users_text(zoo, tmp_path: Path) -> None:
    text = EXAMPLES["ties.yml"].format(dtype="bfloat16", **{k: str(v) for k, v in zoo.items()})
    (tmp_path / "cfg.yml").write_text(text)
    out = merge(tmp_path / "cfg.yml", tmp_path / "out", options=RunOptions(progress=False))
    written = (out / "mergekit_config.yml").read_text()
    assert written == text and "# density gradient" in written
    assert not (out / "safemerge_config.yml").exists()


def test_weight_on_a_method_without_weight_warns(zoo, tmp_path: Path, caplog) -> None:
    cfg = (f"merge_method: sce\nbase_model: {zoo['base']}\nmodels:\n"
           f"  - model: {zoo['m1']}\n    parameters: {{weight: 0.5}}\n"
           f"  - model: {zoo['m2']}\n    parameters: {{weight: 0.5}}\nparameters: {{select_topk: 0.5}}\n")
    with caplog.at_level(logging.WARNING, logger="safemerge"):
        merge(cfg, tmp_path / "w", options=RunOptions(progress=False))
    assert any("'sce' has no 'weight' parameter" in r.getMessage() for r in caplog.records)
    without = cfg.replace("    parameters: {weight: 0.5}\n", "")
    merge(without, tmp_path / "plain", options=RunOptions(progress=False))
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("w", "plain")]
    assert weights[0] == weights[1]
    from safemerge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown parameter 'density'"):
        merge(cfg.replace("weight: 0.5", "density: 0.5"), tmp_path / "x", options=RunOptions(progress=False))


def test_allow_crimes(zoo, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "renamed"
    shutil.copytree(zoo["m1"], other)
    c = json.loads((other / "config.json").read_text())
    c["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(c))
    cfg = f"merge_method: linear\nmodels:\n  - model: {zoo['base']}\n  - model: {other}\nparameters: {{weight: 1.0}}\n"
    from safemerge.errors import CheckpointError

    with pytest.raises(CheckpointError, match="architectures differ"):
        merge(cfg, tmp_path / "no", options=RunOptions(progress=False))
    merge(cfg, tmp_path / "yes", options=RunOptions(progress=False), allow_crimes=True)
    assert (tmp_path / "yes" / "model.safetensors").exists()
