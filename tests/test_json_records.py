"""The one reader of JSON / JSONL record files (``safemerge.io.text.read_json_records``) and the three readers built
on it: training data, synth/optimize data, and the classifier judge's labelled responses."""
from __future__ import annotations

import json

import pytest

from safemerge.errors import SafemergeError
from safemerge.io.text import read_json_records


def test_jsonl_json_list_and_data_object_give_the_same_records_with_their_positions(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    (tmp_path / "r.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "d.json").write_text(json.dumps({"data": rows, "meta": "x"}))
    (tmp_path / "list.jsonl").write_text(json.dumps(rows, indent=1))  # a JSON list whatever the suffix
    assert read_json_records(tmp_path / "r.jsonl", "data file") == [(rows[0], "r.jsonl line 1"),
                                                                     (rows[1], "r.jsonl line 3")]
    assert read_json_records(tmp_path / "r.json", "data file") == [(rows[0], "r.json record 1"),
                                                                    (rows[1], "r.json record 2")]
    assert [r for r, _ in read_json_records(tmp_path / "d.json", "data file")] == rows
    assert [r for r, _ in read_json_records(tmp_path / "list.jsonl", "data file")] == rows


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"a": 1}\n{not json\n', r"line 2 is not valid JSON"),
    ("bad.json", "[1, 2", r"cannot parse data file"),
    ("obj.json", '{"text": "a"}', r"is not a list of records"),
    ("bin.jsonl", b"\xff\xfe", r"not UTF-8"),
])
def test_bad_record_files_are_one_line_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SafemergeError, match=message) as err:
        read_json_records(path, "data file")
    assert "\n" not in str(err.value.args[0])


def test_the_three_readers_share_it(tmp_path):
    from safemerge.evaluate.classifier_fit import read_labelled_responses
    from safemerge.synth.common import read_records
    from safemerge.train.data import load_sft_records

    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": [{"prompt": "p", "response": "r", "text": "t", "label": "safe"}]}))
    assert [(r.prompt, r.response) for r in load_sft_records(path)] == [("p", "r")]
    assert read_records(path)[0]["prompt"] == "p"
    assert read_labelled_responses(path) == (["t"], [0])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n[oops\n')
    for read in (load_sft_records, read_records, read_labelled_responses):
        with pytest.raises(SafemergeError, match="line 2 is not valid JSON"):
            read(tmp_path / "bad.jsonl")
