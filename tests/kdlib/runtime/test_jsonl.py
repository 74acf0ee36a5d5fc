"""Reading JSON files and JSON-lines files: damage is one ReaderError naming the file, the line and what is wrong."""

import json

import pytest

from kdlib.errors import ReaderError
from kdlib.runtime.jsonl import json_document, json_objects


def test_a_whole_document_and_its_damage(tmp_path):
    good = tmp_path / "eval.json"
    good.write_text(json.dumps({"arm": "kd", "metrics": {"accuracy": 0.5}}, indent=1))
    assert json_document(good) == {"arm": "kd", "metrics": {"accuracy": 0.5}}
    cut = tmp_path / "cut.json"
    cut.write_text(good.read_text()[:-12])  # a writer killed mid-file (ours write atomically; a copy may not)
    with pytest.raises(ReaderError, match=r"cut\.json: line 4: malformed JSON: .* \(column \d+\) \(the file is cut "
                                          r"short\); move the file away"):
        json_document(cut)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ReaderError, match=r"list\.json: expected a JSON object, got list"):
        json_document(listed)
    assert json_document(listed, expect=list) == [1, 2]
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"a": 1,\n "b": "caf\xe9"}')
    with pytest.raises(ReaderError, match=r"latin\.json: line 2: not utf-8 text \(byte 0xe9 at offset 19\)"):
        json_document(latin)
    with pytest.raises(ReaderError, match="a folder, expected a file"):
        json_document(tmp_path)
    with pytest.raises(FileNotFoundError):
        json_document(tmp_path / "absent.json")


def test_json_lines_name_the_line_and_bad_bytes(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"id": 1}\n\n{"id": 2}\n{"id": \xff}\n')
    with pytest.raises(ReaderError, match=r"rows\.jsonl: line 4: not utf-8 text \(byte 0xff at offset 28\)"):
        list(json_objects(path))
    path.write_text('{"id": 1}\n\n[3]\n{"id": 2\n')
    with pytest.raises(ReaderError, match=r"rows\.jsonl: line 3: expected a JSON object, got list"):
        list(json_objects(path))
    assert [n for n, _ in json_objects(path, skip_bad=True)] == [1]
