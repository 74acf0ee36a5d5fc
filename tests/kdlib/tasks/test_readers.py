"""Task-set readers (kdlib.tasks.readers): the real gensim polarity sample, round trips through CSV, TSV, JSONL,
fastText and analogy files, and the errors that name the file, line and column."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from kdlib.errors import ReaderError
from kdlib.tasks.readers import TaskConfig, read_task
from kdlib.text.readers import Example

from tests.kdlib.text.test_readers import write_bytes

# Counts verified by hand on gensim 4.4.0's test_data.
PANG_LEE_LABELS = {"neg": 100, "pos": 100}


def test_pang_lee_polarity_labels():
    cfg = TaskConfig(kind="fasttext", path="gensim:pang_lee_polarity.cor", encoding="cp1252")
    first, second = list(read_task(cfg)), list(read_task(cfg))
    assert len(first) == 200 and first == second
    assert Counter(e.label for e in first) == PANG_LEE_LABELS
    assert len({e.id for e in first}) == 200
    assert first[0] == Example(id="pang_lee_polarity.cor:1", text="simplistic , silly and tedious .", label="neg")
    # cp1252 bytes decoded properly: 0xe9 -> é (line 32), 0x97 -> em dash (line 27)
    by_id = {e.id: e for e in first}
    assert "clichés" in by_id["pang_lee_polarity.cor:32"].text
    assert "\u2014" in by_id["pang_lee_polarity.cor:27"].text
    assert all(not e.text.startswith("__label__") for e in first)


def test_pang_lee_is_not_utf8_and_says_so():
    # The packaged file is Windows-1252, not UTF-8: the default encoding must fail loudly at line 27.
    with pytest.raises(ReaderError) as err:
        list(read_task(TaskConfig(kind="fasttext", path="gensim:pang_lee_polarity.cor")))
    assert "pang_lee_polarity.cor" in str(err.value) and "line 27" in str(err.value)
    assert "0x97" in str(err.value) and "encoding" in str(err.value)


def test_csv_task_round_trip_with_pairs(tmp_path):
    f = tmp_path / "pairs.csv"
    f.write_text('premise,hypothesis,gold\n"A man, a plan",A canal,entailment\n\n'
                 '"multi\nline",x,neutral\nplain,"say ""hi""",contradiction\n', encoding="utf-8")
    ex = list(read_task(TaskConfig(kind="csv", path=str(f), text_column="premise",
                                   text_b_column="hypothesis", label_column="gold")))
    assert ex == [Example("pairs.csv:2", "A man, a plan", "entailment", "A canal"),
                  Example("pairs.csv:4", "multi\nline", "neutral", "x"),
                  Example("pairs.csv:6", "plain", "contradiction", 'say "hi"')]


def test_tsv_task_round_trip_keeps_quotes(tmp_path):
    f = tmp_path / "sst.tsv"
    f.write_text('sentence\tlabel\nit\'s "great"\t1\nbad film\t0\n', encoding="utf-8")
    ex = list(read_task(TaskConfig(kind="tsv", path=str(f), text_column="sentence")))
    assert ex == [Example("sst.tsv:2", 'it\'s "great"', "1"), Example("sst.tsv:3", "bad film", "0")]


def test_jsonl_task_labels_as_strings(tmp_path):
    f = tmp_path / "t.jsonl"
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}, {"text": "c", "label": True},
            {"text": "d", "label": 2.5}, {"text": "e", "label": 3.0}]
    f.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = TaskConfig(kind="jsonl", path=str(f))
    assert [e.label for e in read_task(cfg)] == ["1", "pos", "true", "2.5", "3"]
    assert [e.id for e in read_task(TaskConfig(kind="jsonl", path=str(f), max_examples=2))] == ["t.jsonl:1", "t.jsonl:2"]


@pytest.mark.parametrize("kind,name,content", [
    ("csv", "empty.csv", b""),
    ("csv", "header_only.csv", b"text,label\n"),
    ("tsv", "header_only.tsv", b"text\tlabel\n\n"),
    ("fasttext", "empty.ft", b"\n"),
])
def test_empty_task_input(tmp_path, kind, name, content):
    f = write_bytes(tmp_path / name, content)
    with pytest.raises(ReaderError, match=rf"{re.escape(name)}: empty input"):
        list(read_task(TaskConfig(kind=kind, path=str(f))))


def test_null_and_non_string_values(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": null, "label": "y"}\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"n\.jsonl: line 2: column 'text': expected a string, got null"):
        list(read_task(TaskConfig(kind="jsonl", path=str(f))))
    g = tmp_path / "l.jsonl"
    g.write_text('{"text": "a", "label": [1]}\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"l\.jsonl: line 1: column 'label': expected a string or a number, got list"):
        list(read_task(TaskConfig(kind="jsonl", path=str(g))))


def test_fasttext_line_without_label(tmp_path):
    f = tmp_path / "ft.txt"
    f.write_text("__label__pos good\n__label__neg bad\nno label here\n", encoding="utf-8")
    with pytest.raises(ReaderError, match=r"ft\.txt: line 3: expected a line starting `__label__"):
        list(read_task(TaskConfig(kind="fasttext", path=str(f))))
    g = tmp_path / "multi.txt"
    g.write_text("__label__a __label__b two labels\n", encoding="utf-8")
    assert list(read_task(TaskConfig(kind="fasttext", path=str(g)))) == [Example("multi.txt:1", "two labels", "a")]


def test_csv_wrong_field_count_names_line(tmp_path):
    f = tmp_path / "w.csv"
    f.write_text("text,label\na,1\nb,2,extra\n", encoding="utf-8")
    with pytest.raises(ReaderError, match=r"w\.csv: line 3: expected 2 fields like the header, got 3"):
        list(read_task(TaskConfig(kind="csv", path=str(f))))


@pytest.mark.parametrize("kwargs,field", [
    ({"kind": "xml", "path": "x"}, "kind"),
    ({"kind": "csv", "path": ""}, "path"),
    ({"kind": "csv", "path": "x", "label_column": ""}, "label_column"),
    ({"kind": "csv", "path": "x", "label_column": "text"}, "label_column"),
    ({"kind": "fasttext", "path": "x", "text_b_column": "b"}, "text_b_column"),
    ({"kind": "csv", "path": "x", "max_examples": -3}, "max_examples"),
    ({"kind": "csv", "path": "x", "encoding": "klingon"}, "encoding"),
])
def test_task_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        TaskConfig(**kwargs)


def test_analogy_sections_are_labels_and_a_short_read_is_balanced(tmp_path):
    path = tmp_path / "analogies.txt"
    path.write_text(": capital\nAthens Greece Rome Italy\nParis France Oslo Norway\nLima Peru Kiev Ukraine\n"
                    ": family\nboy girl son daughter\nking queen man woman\n")
    examples = list(read_task(TaskConfig(kind="analogy", path=str(path))))
    assert sorted((e.label, e.text) for e in examples) == [
        ("capital", "Athens Greece Rome Italy"), ("capital", "Lima Peru Kiev Ukraine"),
        ("capital", "Paris France Oslo Norway"), ("family", "boy girl son daughter"), ("family", "king queen man woman")]
    assert [e.label for e in examples] == ["capital", "family", "capital", "family", "capital"]  # round robin
    assert {e.id for e in examples} == {f"analogies.txt:{n}" for n in (2, 3, 4, 6, 7)}
    real = list(read_task(TaskConfig(kind="analogy", path="gensim:questions-words.txt", max_examples=140)))
    assert Counter(e.label for e in real) == {label: 10 for label in {e.label for e in real}} and len(set(
        e.label for e in real)) == 14
    assert len({e.id for e in real}) == 140 and all(len(e.text.split()) == 4 for e in real)
    path.write_text("Athens Greece Rome Italy\n: capital\n")
    with pytest.raises(ReaderError, match=r"analogies.txt: line 1: expected a `: section` header"):
        list(read_task(TaskConfig(kind="analogy", path=str(path))))


@pytest.mark.parametrize("kind,name,content,line,first", [
    ("jsonl", "d.jsonl", '{"id": "7", "text": "a", "label": "x"}\n{"id": "8", "text": "b", "label": "y"}\n\n'
                         '{"id": "7", "text": "c", "label": "x"}\n', 4, 1),
    ("csv", "d.csv", 'id,text,label\n3,a,x\n"7","two\nlines",y\n7,c,x\n', 5, 3),
    ("tsv", "d.tsv", "id\ttext\tlabel\n7\ta\tx\n8\tb\ty\n7\tc\tx\n", 4, 2),
])
def test_a_repeated_id_is_refused_naming_both_lines(tmp_path, kind, name, content, line, first):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    cfg = TaskConfig(kind=kind, path=str(f), id_column="id")
    with pytest.raises(ReaderError) as err:
        list(read_task(cfg))
    assert str(err.value) == f"{f}: line {line}: id_column 'id': id '7' already used on line {first}"
    # without id_column the ids are <file>:<line>, unique by construction: the same file reads
    assert [e.id for e in read_task(TaskConfig(kind=kind, path=str(f)))][-1] == f"{name}:{line}"


def test_ids_are_compared_as_text_so_7_and_quoted_7_are_one_id(tmp_path):
    f = tmp_path / "n.jsonl"
    f.write_text('{"id": 7, "text": "a", "label": "x"}\n{"id": 7.0, "text": "b", "label": "y"}\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"n\.jsonl: line 2: id_column 'id': id '7' already used on line 1$"):
        list(read_task(TaskConfig(kind="jsonl", path=str(f), id_column="id")))
    f.write_text('{"id": 7, "text": "a", "label": "x"}\n{"id": "7", "text": "b", "label": "y"}\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"n\.jsonl: line 2: id_column 'id': id '7' already used on line 1$"):
        list(read_task(TaskConfig(kind="jsonl", path=str(f), id_column="id")))


def test_unique_ids_still_read_as_written(tmp_path):
    f = tmp_path / "u.jsonl"
    f.write_text('{"id": 7, "text": "a", "label": "x"}\n{"id": "07", "text": "b", "label": "y"}\n'
                 '{"id": "7b", "text": "c", "label": "x"}\n', encoding="utf-8")
    assert list(read_task(TaskConfig(kind="jsonl", path=str(f), id_column="id"))) == [
        Example("7", "a", "x"), Example("07", "b", "y"), Example("7b", "c", "x")]
    g = tmp_path / "u.csv"
    g.write_text("id,text,label\n1,a,x\n2,b,y\n", encoding="utf-8")
    assert [e.id for e in read_task(TaskConfig(kind="csv", path=str(g), id_column="id"))] == ["1", "2"]
