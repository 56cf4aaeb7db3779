"""``safemerge methods``: lists every method and shows one method's parameters."""
from __future__ import annotations

import json

import pytest

from safemerge.cli import main


def test_methods_json_lists_mergekit_methods(capsys: pytest.CaptureFixture[str]) -> None:
    main(["methods", "--json"])
    data = json.loads(capsys.readouterr().out)
    names = {m["name"] for m in data}
    assert {"linear", "ties", "dare_ties", "della", "slerp", "karcher", "passthrough"} <= names
    linear = next(m for m in data if m["name"] == "linear")
    assert linear["base_in_tensors"] is True
    assert {"name": "weight",
            "required": True}.items() <= next(p for p in linear["params"] if p["name"] == "weight").items()


def test_methods_single_method_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["methods", "della"])
    out = capsys.readouterr().out
    assert "epsilon" in out and "density" in out and "Deep et al. 2024" in out


def test_methods_unknown_name_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["methods", "tie"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: unknown merge_method 'tie'" in err and "hint: did you mean 'ties'?" in err
