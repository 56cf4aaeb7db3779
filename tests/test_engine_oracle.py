"""End-to-end oracle: ``safemerge merge`` and mergekit 0.1.5 give the same tensors (fp32, 1e-6).

Tiny Llama, Mistral and Qwen2 models are built locally; every method the two tools share is
run through both with the same YAML — including gradients, conditional filters and slices.
mergekit runs in-process (``mergekit.merge.run_merge``) so its import cost is paid once.
"""
from __future__ import annotations

import glob
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
mergekit = pytest.importorskip("mergekit")

from safetensors.torch import load_file  # noqa: E402

from safemerge.api import merge  # noqa: E402
from safemerge.options import RunOptions  # noqa: E402
from safemerge.testing import make_tiny_model, perturb_model, save_model  # noqa: E402


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("oracle_zoo")
    out: dict[str, dict[str, Path]] = {}
    for arch in ("llama", "mistral", "qwen2"):
        base = make_tiny_model(arch, seed=0, layers=3)
        paths = {"base": save_model(base, root / f"{arch}_base")}
        for i in (1, 2, 3):
            m = make_tiny_model(arch, seed=0, layers=3)
            perturb_model(m, seed=10 * i + len(arch), scale=0.02)
            paths[f"m{i}"] = save_model(m, root / f"{arch}_m{i}")
        out[arch] = paths
    return out


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(d / "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


def _run_mergekit(yaml_text: str, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml_text))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, random_seed=0, lazy_unpickle=False, quiet=True))


CONFIGS: dict[str, str] = {
    "linear_gradient_filter": """
merge_method: linear
models:
  - model: {m1}
    parameters:
      weight:
        - filter: self_attn
          value: [0.2, 0.8]
        - value: 0.5
  - model: {m2}
    parameters: {{weight: [1.0, 0.3, 0.7]}}
  - model: {m3}
    parameters: {{weight: 0.25}}
dtype: float32
""",
    "linear_unnormalized": """
merge_method: linear
models:
  - model: {m1}
    parameters: {{weight: 0.7}}
  - model: {m2}
    parameters: {{weight: 0.6}}
parameters: {{normalize: false}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: [0.3, 1.0]}}
  - model: {m2}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.4, density: [0.3, 0.9]}}
  - model: {m3}
    parameters:
      weight: 0.3
      density:
        - filter: mlp
          value: 0.2
        - value: 0.7
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
""",
    "ties_slices": """
merge_method: ties
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {m1}
        layer_range: [0, 2]
        parameters: {{weight: 0.5, density: 0.6}}
      - model: {m2}
        layer_range: [1, 3]
        parameters: {{weight: 0.5, density: 0.4}}
  - sources:
      - model: {base}
        layer_range: [2, 3]
      - model: {m1}
        layer_range: [2, 3]
        parameters: {{weight: 1.0, density: 0.5}}
      - model: {m2}
        layer_range: [0, 1]
        parameters: {{weight: 0.2, density: 0.5}}
dtype: float32
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
  - model: {m2}
    parameters: {{weight: 0.5, density: 0.7, gamma: 0.02}}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
  - model: {m2}
    parameters: {{weight: 0.5, density: 0.7, gamma: 0.02}}
dtype: float32
""",
    "slerp_gradient": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "nuslerp": """
merge_method: nuslerp
models:
  - model: {m1}
    parameters: {{weight: 0.3}}
  - model: {m2}
    parameters: {{weight: 0.7}}
dtype: float32
""",
    "nuslerp_base_rowwise": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.6}}
  - model: {m2}
    parameters: {{weight: 0.4}}
parameters: {{nuslerp_row_wise: true, nuslerp_flatten: false}}
dtype: float32
""",
    "multislerp": """
merge_method: multislerp
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.2}}
dtype: float32
""",
    "karcher": """
merge_method: karcher
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
parameters: {{max_iter: 20, tol: 1.0e-7}}
dtype: float32
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
dtype: float32
""",
    "sce": """
merge_method: sce
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
parameters: {{select_topk: 0.5}}
dtype: float32
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters: {{t: 0.02}}
dtype: float32
""",
    "passthrough_frankenmerge": """
merge_method: passthrough
slices:
  - sources:
      - model: {m1}
        layer_range: [0, 2]
  - sources:
      - model: {m2}
        layer_range: [1, 3]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
dtype: float32
""",
    "dare_ties_density_one": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.6, density: 1.0}}
  - model: {m2}
    parameters: {{weight: 0.4, density: 1.0}}
dtype: float32
""",
}

ARCH_CASES = [("llama", name) for name in CONFIGS] + [
    (arch, name) for arch in ("mistral", "qwen2") for name in ("linear_gradient_filter", "ties", "slerp_gradient",
                                                               "ties_slices", "model_stock")
]


@pytest.mark.parametrize("arch,case", ARCH_CASES, ids=[f"{a}-{c}" for a, c in ARCH_CASES])
def test_matches_mergekit(zoo, tmp_path: Path, arch: str, case: str) -> None:
    yaml_text = CONFIGS[case].format(**{k: str(v) for k, v in zoo[arch].items()})
    (tmp_path / "cfg.yml").write_text(yaml_text)
    _run_mergekit(yaml_text, tmp_path / "mk")
    merge(tmp_path / "cfg.yml", tmp_path / "sm", options=RunOptions(progress=False, threads=2))
    ours, theirs = _load_dir(tmp_path / "sm"), _load_dir(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        assert ours[name].shape == t.shape, name
        torch.testing.assert_close(ours[name], t, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    import json

    c_ours = json.loads((tmp_path / "sm" / "config.json").read_text())
    c_theirs = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert c_ours["num_hidden_layers"] == c_theirs["num_hidden_layers"]
