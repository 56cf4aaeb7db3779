"""``safemerge merge --eval`` puts a safety report (from the evaluation harness) into the model card."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_merge_eval_report_in_card(tmp_path, capsys) -> None:
    from safemerge.cli import main
    from safemerge.testing import make_tiny_model, perturb_model, save_model

    a = save_model(make_tiny_model("llama", seed=0), tmp_path / "a")
    b = save_model(perturb_model(make_tiny_model("llama", seed=0), seed=1), tmp_path / "b")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n  "
                   f"  parameters: {{weight: 0.5}}\n")
    try:
        main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--eval", "--eval-limit", "2",
              "--eval-utility", "builtin:arithmetic"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = tmp_path / "out"
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["harmful"]["n"] == 2 and results["benign"]["n"] == 2 and results["utility"]["n"] == 2
    card = (out / "README.md").read_text()
    assert "## Safety evaluation" in card and "harmful rate" in card
    rate = f"{100 * results['harmful']['harmful_rate']:.1f}%"
    assert rate in card
