"""Table-1 report of safety-aware merging (Hammoud et al. 2024): labels, the markdown table, and the
``optimize --eval`` → ``compare --table1`` path on the command line."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from optimize_world import build_world, config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("reportworld"))


def test_labels_follow_the_papers_table():
    from safemerge.optimize.report import data_label, method_label

    assert method_label("evomm", "ties") == "TIES EvoMM"
    assert method_label("grid", "dare_ties") == "DARE-TIES grid search"
    assert method_label("cocktail", "linear") == "LM-Cocktail"
    assert data_label(0, 5) == "D_exp"
    assert data_label(4, 5) == "D_exp ∪ D_safe"
    assert data_label(4, 0) == "D_safe"
    assert data_label(0, 0) == "–"


def test_table1_rows_alignment_is_one_minus_harmful_and_extra_columns_are_the_union():
    from safemerge.optimize.report import row_from_eval, table1_markdown

    a = row_from_eval("pool: aligned", "–", {"harmful": {"harmful_rate": 0.25, "refusal_rate": 0.75},
                                             "utility": {"accuracy": 0.5}})
    b = row_from_eval("TIES EvoMM", "D_exp", {"harmful": {"harmful_rate": 0.125, "refusal_rate": 0.875}},
                      s_per_cand=2.5)
    assert a["alignment"] == pytest.approx(0.75) and b["accuracy"] is None
    lines = table1_markdown([a, b], domain="arith").splitlines()
    assert lines[0] == "| Method | Data | Align (% safe) | Refusal (%) | Acc arith (%) | s_per_cand |"
    assert lines[2] == "| pool: aligned | – | 75.0 | 75.0 | 50.0 | – |"
    assert lines[3] == "| TIES EvoMM | D_exp | 87.5 | 87.5 | – | 2.5 |"


def test_optimize_eval_then_compare_table1(world, tmp_path, capsys):
    from safemerge.cli import main

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(config(world, max_evals=4, popsize=4)))
    out = tmp_path / "evo"
    main(["optimize", str(cfg), "-o", str(out), "--no-progress", "--eval", "--eval-limit", "2", "--eval-utility",
          "builtin:arithmetic"])
    printed = capsys.readouterr().out
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["harmful"]["n"] == 2 and results["utility"]["n"] == 2
    summary = json.loads((out / "summary.json").read_text())
    row = summary["evaluation"]
    assert row["method"] == "TIES EvoMM" and row["data"] == "D_exp ∪ D_safe"
    assert row["alignment"] == pytest.approx(1 - results["harmful"]["harmful_rate"])
    assert row["accuracy"] == pytest.approx(results["utility"]["accuracy"])
    assert "| TIES EvoMM | D_exp ∪ D_safe |" in printed
    assert "## Evaluation of the merged model" in (out / "report.md").read_text()

    # a plain `safemerge eval` run next to it; compare labels the optimize run by strategy and data
    plain = tmp_path / "aligned"
    main(["eval", world["aligned"], "-o", str(plain), "--harmful", "builtin:harmful", "--limit", "2", "--no-progress"])
    capsys.readouterr()
    table = tmp_path / "table1.md"
    main(["compare", str(plain), str(out), "--plot", str(tmp_path / "c.png"), "--table1", str(table), "--domain",
          "arith"])
    lines = table.read_text().splitlines()
    assert lines[0].startswith("| Method | Data | Align (% safe) | Refusal (%) | Acc arith (%) |")
    assert lines[2].startswith("| aligned | – |")
    assert lines[3].startswith("| TIES EvoMM | D_exp ∪ D_safe |")
    assert (tmp_path / "c.png").is_file()


def test_eval_needs_the_model(world, tmp_path, capsys):
    from safemerge.cli import main

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(config(world, max_evals=4, popsize=4)))
    with pytest.raises(SystemExit) as e:
        main(["optimize", str(cfg), "-o", str(tmp_path / "o"), "-q", "--eval", "--no-save-model"])
    assert e.value.code == 2 and "needs the merged model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
