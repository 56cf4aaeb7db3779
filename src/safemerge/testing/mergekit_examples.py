"""mergekit's own example configs (``examples/*.yml`` in arcee-ai/mergekit), adapted only by path.

Each is a ``str.format`` template with ``{base}``, ``{m1}``, ``{m2}``, ``{m3}`` (model paths) and
``{dtype}`` (mergekit's examples use float16/bfloat16). Layer ranges are scaled to 3-layer tiny
models; everything else — methods, parameters, gradients, filters, comments — is mergekit's.
Used by ``tests/test_mergekit_parity.py`` and ``bench/mergekit_parity.py``.
"""
from __future__ import annotations

EXAMPLES: dict[str, str] = {
    "ties.yml": """
models:
  - model: {m1}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {m2}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {m3}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: {dtype}
""",
    "bio-merge.yml": """
models:
  - model: {m1}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {m2}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: false
  int8_mask: true
dtype: {dtype}
""",
    "linear.yml": """
models:
  - model: {m1}
    parameters:
      weight: 1.0
  - model: {m2}
    parameters:
      weight: 0.3
  - model: {m3}
    parameters:
      weight: 0.5
merge_method: linear
dtype: {dtype}
""",
    "gradient-slerp.yml": """
slices:
  - sources:
      - model: {m1}
        layer_range: [0, 3]
      - model: {m2}
        layer_range: [0, 3]
merge_method: slerp
base_model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: {dtype}
""",
    "orcamini-platy-44layer.yml": """
slices:
  - sources:
    - model: {m1}
      layer_range: [0, 2]
  - sources:
    - model: {m2}
      layer_range: [1, 3]
merge_method: passthrough
dtype: {dtype}
""",
    "arcee_fusion.yml": """
models:
  - model: {m1}
  - model: {m2}
merge_method: arcee_fusion
base_model: {m1}
dtype: {dtype}
""",
}
