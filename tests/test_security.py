"""Security guarantees: no shell, no remote code by default, pickle refused, escaped model cards."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from safemerge.options import RunOptions

SRC = Path(__file__).resolve().parents[1] / "src" / "safemerge"


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in SRC.rglob("*.py")]


def test_nothing_reaches_a_shell() -> None:
    bad = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.getoutput|commands\.getoutput")
    hits = [f"{p}:{i + 1}" for p, text in _sources() for i, line in enumerate(text.splitlines()) if bad.search(line)]
    assert not hits, hits


def test_trust_remote_code_never_hard_coded_on() -> None:
    hits = [f"{p}:{i + 1}" for p, text in _sources() for i, line in enumerate(text.splitlines())
            if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert not hits, hits


def test_no_unsafe_torch_load() -> None:
    """Every torch.load passes weights_only=True."""
    for p, text in _sources():
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{p}: {m.group(0)}"


def test_pickle_checkpoint_refused_then_weights_only(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from safemerge.errors import CheckpointError
    from safemerge.io.checkpoint import Checkpoint

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "m"
    d.mkdir()
    torch.save({"w": torch.ones(2), "evil": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(d)
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(d, options=RunOptions(allow_pickle=True))  # the object is rejected by weights_only loading
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin")
    assert Checkpoint(d, options=RunOptions(allow_pickle=True)).get("w").tolist() == [1.0, 1.0]


def test_model_card_escapes_user_strings(tmp_path) -> None:
    pytest.importorskip("torch")
    import yaml

    from safemerge.api import merge
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    weird = tmp_path / "evil<img src=x onerror=alert(1)> [link](http://x) `code` --- "
    a = save_model(make_tiny_model("llama", seed=0), weird)
    b = save_model(perturb_model(make_tiny_model("llama", seed=0), seed=1), tmp_path / "b")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(a),
                                                                         "parameters": {"weight": 0.5}},
                                                                         {"model": str(b),
                                                                          "parameters": {"weight": 0.5}}]}))
    out = merge(cfg, tmp_path / "out", options=RunOptions(progress=False))
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert isinstance(yaml.safe_load(front), dict)  # front-matter still parses
    body = card.split("## Configuration")[0]
    assert not re.search(r"(?<!\\)<img", body) and not re.search(r"(?<!\\)\]\(http", body)
    assert "\\<img" in body
