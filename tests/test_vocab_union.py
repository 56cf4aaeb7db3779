"""Vocabulary re-indexing against mergekit 0.1.5: ``tokenizer_source: union | base | MODEL``,
``tokenizer.tokens`` (model, model_token, zero, force) and ``pad_to_multiple_of``.

Three tiny Llama models with different tokenizers (shifted ids, extra words) and vocabulary sizes
(128, 128, 136) are merged by ``mergekit-yaml`` (in-process ``run_merge``) and by safemerge.
mergekit assigns the ids of union-added tokens in hash-map order (different in every process),
so rows are compared token by token: for every token of the output vocabulary, our embedding
and ``lm_head`` rows equal mergekit's rows of the same token. For the same reason ``union`` is
paired here only with element-wise methods (linear, task_arithmetic): position-dependent ones
(TIES breaking exact top-k ties, DARE's Bernoulli masks) depend on mergekit's random row order,
so mergekit does not even reproduce itself there. TIES is checked with ``source: base``.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from safetensors.torch import load_file  # noqa: E402

from safemerge.api import merge  # noqa: E402
from safemerge.errors import ConfigError  # noqa: E402
from safemerge.options import RunOptions  # noqa: E402
from safemerge.testing import build_tokenizer, make_tiny_model, perturb_model, save_model  # noqa: E402

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab_zoo")
    base = save_model(make_tiny_model("llama", seed=0), root / "base")
    m1 = save_model(perturb_model(make_tiny_model("llama", seed=0), seed=1, scale=0.03), root / "m1",
                    tokenizer=build_tokenizer(128, words=["alpha", "beta"]))
    m2 = save_model(perturb_model(make_tiny_model("llama", seed=0, vocab_size=136), seed=2, scale=0.03), root / "m2",
                    tokenizer=build_tokenizer(136, words=["gamma", "alpha", "delta"]))
    return {"base": base, "m1": m1, "m2": m2}


def _load(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    from transformers import AutoTokenizer

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(d / "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors, AutoTokenizer.from_pretrained(str(d)).get_vocab()


def _run_mergekit(text: str, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(copy_tokenizer=True, random_seed=0, quiet=True))


def _assert_same_by_token(ours_dir: Path, theirs_dir: Path, exact: bool, padding_exact: bool) -> int:
    """Every tensor equal (``exact``: bit for bit, else to 1e-6); vocabulary rows matched by token.
    The padding rows are means over the vocabulary rows, whose order (hence float rounding) follows
    the ids: with ``union`` mergekit's ids are random, so there they agree to one rounding only."""
    ours, vocab = _load(ours_dir)
    theirs, their_vocab = _load(theirs_dir)
    assert set(vocab) == set(their_vocab)
    assert set(ours) == set(theirs)
    tokens = sorted(vocab, key=vocab.get)
    for name, t in theirs.items():
        o = ours[name]
        assert o.shape == t.shape, name
        if name in VOCAB_TENSORS:
            n = len(vocab)
            o_rows = o[[vocab[tok] for tok in tokens]]
            t_rows = t[[their_vocab[tok] for tok in tokens]]
            pairs = [(o_rows, t_rows, exact)]
            if o.shape[0] > n:  # the padding rows are positional
                pairs.append((o[n:], t[n:], exact and padding_exact))
        else:
            pairs = [(o, t, exact)]
        for a, b, bitwise in pairs:
            if bitwise:
                assert torch.equal(a, b), name
            else:
                atol = 1e-6 if a.dtype == torch.float32 else 2e-5
                torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    c_ours = json.loads((ours_dir / "config.json").read_text())
    assert c_ours["vocab_size"] == json.loads((theirs_dir / "config.json").read_text())["vocab_size"]
    return c_ours["vocab_size"]


CONFIGS = {
    "linear_union": """
merge_method: linear
models:
  - model: {base}
  - model: {m1}
  - model: {m2}
parameters: {{weight: 1.0}}
tokenizer_source: union
dtype: {dtype}
""",
    "ties_base_tokens": """
merge_method: ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.4, density: 0.7}}
tokenizer:
  source: base
  tokens:
    <|im_start|>:
      source: {m1}
      force: true
    z:
      source: {{kind: model_token, model: {m2}, token: gamma}}
      force: true
    q:
      source: {{kind: zero}}
      force: true
dtype: {dtype}
""",
    "task_arithmetic_union_pad": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.7}}
  - model: {m2}
    parameters: {{weight: 0.2}}
tokenizer:
  pad_to_multiple_of: 64   # source defaults to union, as in mergekit
  tokens:
    <|im_end|>:
      source: {m2}
      force: true
    alpha:
      source: {{kind: model_token, model: {base}, token: a}}
    brand_new:
      source: {{kind: zero}}
    gamma:
      source: {{kind: model_token, model: {m2}, token_id: 9}}
dtype: {dtype}
""",
    "task_arithmetic_model_tokenizer": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.5}}
tokenizer_source: {m2}
dtype: {dtype}
""",
    "slerp_base_tokenizer": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {m1}
parameters: {{t: 0.4}}
tokenizer:
  source: base
  pad_to_multiple_of: 48
dtype: {dtype}
""",
}
CASES = [(c, d, mode) for c in CONFIGS for d, mode in (("float32", "default"), ("float16", "mergekit_arithmetic"))]


@pytest.mark.parametrize("case,dtype,mode", CASES, ids=[f"{c}-{d}-{m}" for c, d, m in CASES])
def test_vocabulary_matches_mergekit(zoo, tmp_path: Path, case: str, dtype: str, mode: str) -> None:
    text = CONFIGS[case].format(dtype=dtype, **{k: str(v) for k, v in zoo.items()})
    (tmp_path / "cfg.yml").write_text(text)
    _run_mergekit(text, tmp_path / "mk")
    # (the padding rows are identical copies, so TIES meets exactly equal magnitudes at its top-k cut-off)
    merge(tmp_path / "cfg.yml", tmp_path / "sm", options=RunOptions(progress=False, threads=2), mergekit_tie_break=True,
          mergekit_arithmetic=mode == "mergekit_arithmetic")
    vocab_size = _assert_same_by_token(tmp_path / "sm", tmp_path / "mk", exact=mode == "mergekit_arithmetic",
                                       padding_exact="union" not in case)
    if "pad" in case:
        assert vocab_size % 16 == 0 and vocab_size > 128


def test_union_output_loads_and_is_deterministic(zoo, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = CONFIGS["task_arithmetic_union_pad"].format(dtype="bfloat16", **{k: str(v) for k, v in zoo.items()})
    a = merge(text, tmp_path / "a", options=RunOptions(progress=False))
    b = merge(text, tmp_path / "b", options=RunOptions(progress=False, threads=1))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    for word in ("alpha", "beta", "gamma", "delta", "brand_new"):
        assert word in tok.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == 192  # 128 + 7 → 192 (÷64)
    ids = tok("alpha beta gamma", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == 192


def test_token_config_errors(zoo, tmp_path: Path) -> None:
    base = CONFIGS["task_arithmetic_union_pad"].format(dtype="float32", **{k: str(v) for k, v in zoo.items()})
    with pytest.raises(ConfigError, match="not a token of"):
        merge(base.replace("token: a}", "token: nope}"), tmp_path / "x", options=RunOptions(progress=False))
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        merge(base.replace("pad_to_multiple_of: 64", "pad_to_multiple_of: 0"), tmp_path / "y",
              options=RunOptions(progress=False))
    with pytest.raises(ConfigError, match="token_id"):
        merge(base.replace("token_id: 9}", "token_id: 9, token: x}"), tmp_path / "z",
              options=RunOptions(progress=False))
    assert not any(p.name in ("x", "y", "z") for p in tmp_path.iterdir())
