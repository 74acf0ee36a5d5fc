"""Corpus readers (kdlib.text.readers): counts from the real gensim test files, round trips through every format,
error messages. Task-set readers: tests/kdlib/tasks/test_readers.py."""
from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import pytest

from kdlib.errors import KDError, ReaderError
from kdlib.tasks.readers import TaskConfig, read_task
from kdlib.text.readers import CorpusConfig, Document, clean_wiki_text, gensim_test_data, normalize_text, read_corpus
from kdlib.text.readers import paths as reader_paths

# Counts verified by hand on gensim 4.4.0's test_data (see the report). The Wikipedia sample has
# 206 pages; 100 are redirects (99 `#REDIRECT` plus page 617 "Albert Gore" written `#redirect`).
WIKI_PAGES, WIKI_REDIRECTS, WIKI_ARTICLES = 206, 100, 106
LEE_BACKGROUND_DOCS = 300


@pytest.fixture(scope="module")
def wiki_docs() -> list[Document]:
    # Reading the dump costs ~4 s (filter_wiki), so it is read once for all Wikipedia tests.
    return list(read_corpus(CorpusConfig(kind="wikipedia_xml")))


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- real packaged files


@pytest.mark.slow
def test_wikipedia_sample_counts_and_ids(wiki_docs):
    from gensim.corpora.wikicorpus import extract_pages

    # Independent count of the raw pages straight from gensim, to pin where 106 comes from.
    with bz2.open(reader_paths.DEFAULT_WIKI_DUMP, "rb") as fh:
        raw = [(pid, text) for _title, text, pid in extract_pages(fh)]
    assert len(raw) == WIKI_PAGES
    redirects = {pid for pid, text in raw if text.lstrip().lower().startswith("#redirect")}
    assert len(redirects) == WIKI_REDIRECTS
    assert len(wiki_docs) == WIKI_ARTICLES == WIKI_PAGES - WIKI_REDIRECTS
    ids = [d.id for d in wiki_docs]
    assert ids == [f"wiki:{pid}" for pid, text in raw if pid not in redirects]
    assert len(set(ids)) == len(ids)
    assert "wiki:617" not in ids  # the lower-case `#redirect` page
    assert ids[:3] == ["wiki:12", "wiki:25", "wiki:39"]  # Anarchism, Autism, Albedo
    total = sum(len(d.text) for d in wiki_docs)
    assert 2_900_000 < total < 3_200_000  # ~3.0 M characters of article text


@pytest.mark.slow
def test_wikipedia_text_has_no_markup_left(wiki_docs):
    for doc in wiki_docs:
        assert doc.text and doc.text == doc.text.strip()
        assert "''" not in doc.text, doc.id
        assert "\n\n\n" not in doc.text, doc.id
        for token in ("[[", "]]", "{{", "}}", "|alt=", "alt=", "thumb|"):
            assert token not in doc.text, (doc.id, token)
        for line in doc.text.split("\n"):
            assert not line.startswith("=="), (doc.id, line)
            assert not re.fullmatch(r"[{}|!\-\s]+", line), (doc.id, line)
    anarchism = wiki_docs[0].text
    assert anarchism.startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert "\n\nEtymology and terminology\n\n" in anarchism  # `==Etymology and terminology==` kept as text


@pytest.mark.slow
def test_wikipedia_ids_stable_across_reads(wiki_docs):
    again = list(read_corpus(CorpusConfig(kind="wikipedia_xml", max_documents=5)))
    assert again == wiki_docs[:5]


def test_clean_wiki_text_by_hand():
    raw = ("==History==\n'''Bold''' and ''italic'' text.\n\n\n\n* item one\n{|\n|-\n! \n|}\n"
           "File:Foo.jpg|thumb|220px|A caption|alt=A picture of foo\nFlag 30px\n[[stray]] {{x}}")
    assert clean_wiki_text(raw) == "History\nBold and italic text.\n\nitem one\n\nA caption\nFlag\nstray x"


def test_lee_background_one_doc_per_line():
    cfg = CorpusConfig(kind="text", path="gensim:lee_background.cor", text_mode="line")
    first, second = list(read_corpus(cfg)), list(read_corpus(cfg))
    assert len(first) == LEE_BACKGROUND_DOCS
    assert first == second
    assert len({d.id for d in first}) == LEE_BACKGROUND_DOCS
    assert first[0].id == "lee_background.cor:1" and first[-1].id == "lee_background.cor:300"
    assert first[0].text.startswith("Hundreds of people have been forced to vacate their homes")
    assert list(read_corpus(CorpusConfig(kind="text", path="gensim:lee_background.cor", max_documents=7))) \
        == first[:7]


def test_real_non_utf8_corpus_names_line():
    # gensim's lee.cor holds a latin-1 pound sign (0xa3) on line 41.
    with pytest.raises(ReaderError, match=r"lee\.cor: line 41: invalid utf-8 byte 0xa3"):
        list(read_corpus(CorpusConfig(kind="text", path="gensim:lee.cor")))
    docs = list(read_corpus(CorpusConfig(kind="text", path="gensim:lee.cor", encoding="latin-1")))
    assert "£" in next(d.text for d in docs if d.id == "lee.cor:41")


def test_gensim_paths_refuse_pickles_and_escapes():
    assert gensim_test_data("lee_background.cor").name == "lee_background.cor"
    with pytest.raises(ReaderError, match="pickle"):
        list(read_corpus(CorpusConfig(kind="text", path="gensim:phrases-no-scoring.pkl")))
    with pytest.raises(ReaderError, match="outside"):
        gensim_test_data("../../__init__.py")
    with pytest.raises(ReaderError, match="no-such-file.txt"):
        gensim_test_data("no-such-file.txt")


def test_pickle_detected_by_content(tmp_path):
    import pickle

    path = write_bytes(tmp_path / "innocent.txt", pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(ReaderError, match="innocent.txt: refusing to read a pickle"):
        list(read_corpus(CorpusConfig(kind="text", path=str(path))))


# ---------------------------------------------------------------- text modes


def test_text_modes(tmp_path):
    body = "first para line one\nline two\n\n\n  second para  \n\nthird\n"
    f = tmp_path / "doc.txt"
    f.write_text(body, encoding="utf-8")
    lines = list(read_corpus(CorpusConfig(kind="text", path=str(f), text_mode="line")))
    assert lines == [Document("doc.txt:1", "first para line one"), Document("doc.txt:2", "line two"),
                     Document("doc.txt:5", "second para"), Document("doc.txt:7", "third")]
    paras = list(read_corpus(CorpusConfig(kind="text", path=str(f), text_mode="blank_line")))
    assert paras == [Document("doc.txt:1", "first para line one\nline two"), Document("doc.txt:5", "second para"),
                     Document("doc.txt:7", "third")]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("bee\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("skip me", encoding="utf-8")
    files = list(read_corpus(CorpusConfig(kind="text", path=str(tmp_path), text_mode="file")))
    assert files == [Document("doc.txt", body.strip()), Document("sub/b.txt", "bee")]


def test_text_bom_crlf_and_bz2(tmp_path):
    f = write_bytes(tmp_path / "w.txt", "\ufeffalpha\r\nbeta\r\n".encode("utf-8"))
    assert [d.text for d in read_corpus(CorpusConfig(kind="text", path=str(f)))] == ["alpha", "beta"]
    z = write_bytes(tmp_path / "z.txt.bz2", bz2.compress("one\ntwo\nthree\n".encode()))
    assert [d.id for d in read_corpus(CorpusConfig(kind="text", path=str(z)))] == \
        ["z.txt.bz2:1", "z.txt.bz2:2", "z.txt.bz2:3"]


# ---------------------------------------------------------------- round trips


def test_jsonl_corpus_round_trip(tmp_path):
    texts = ["héllo wörld", "same", "same", "line\nbreak"]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)) + "\n\n", encoding="utf-8")
    docs = list(read_corpus(CorpusConfig(kind="jsonl", path=str(f), text_column="body")))
    assert [d.text for d in docs] == texts
    assert [d.id for d in docs] == ["c.jsonl:1", "c.jsonl:2", "c.jsonl:3", "c.jsonl:4"]  # duplicates stay distinct


def test_parquet_round_trip_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i}" for i in range(2500)]  # > 2 read batches of 1024 rows
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": texts, "k": list(range(2500))}), f, row_group_size=700)
    docs = list(read_corpus(CorpusConfig(kind="parquet", path=str(f), text_column="content")))
    assert [d.text for d in docs] == texts
    assert docs[0].id == "c.parquet:0" and docs[2499].id == "c.parquet:2499"
    assert len({d.id for d in docs}) == 2500


def test_hf_disk_round_trip(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a b", "c d", "e"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "single"))
    docs = list(read_corpus(CorpusConfig(kind="hf_disk", path=str(tmp_path / "single"))))
    assert docs == [Document("single:0", "a b"), Document("single:1", "c d"), Document("single:2", "e")]

    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["v"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    val = list(read_corpus(CorpusConfig(kind="hf_disk", path=str(tmp_path / "dict"), split="validation")))
    assert val == [Document("dict:validation:0", "v")]
    with pytest.raises(ReaderError, match=r"dict: split: expected one of \['train', 'validation'\]"):
        list(read_corpus(CorpusConfig(kind="hf_disk", path=str(tmp_path / "dict"))))
    with pytest.raises(ReaderError, match=r"missing column 'body'; the columns are \['label', 'text'\]"):
        list(read_corpus(CorpusConfig(kind="hf_disk", path=str(tmp_path / "single"), text_column="body")))


# ---------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ReaderError, match="nope.jsonl: no such file"):
        read_corpus(CorpusConfig(kind="jsonl", path=str(missing)))  # raised at once, before iteration
    with pytest.raises(ReaderError, match="nope.csv"):
        read_task(TaskConfig(kind="csv", path=str(tmp_path / "nope.csv")))


@pytest.mark.parametrize("kind,name,content", [
    ("text", "empty.txt", b""),
    ("text", "blank.txt", b"\n   \n\n"),
    ("jsonl", "empty.jsonl", b"\n\n"),
    ("jsonl", "emptytext.jsonl", b'{"text": "  "}\n'),
])
def test_empty_corpus_input(tmp_path, kind, name, content):
    f = write_bytes(tmp_path / name, content)
    with pytest.raises(ReaderError, match=rf"{re.escape(name)}: empty input"):
        list(read_corpus(CorpusConfig(kind=kind, path=str(f))))


def test_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "none.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), f)
    with pytest.raises(ReaderError, match="none.parquet: empty input"):
        list(read_corpus(CorpusConfig(kind="parquet", path=str(f))))


def test_missing_column_jsonl_names_line_and_columns(tmp_path):
    f = tmp_path / "cols.jsonl"
    f.write_text('{"text": "ok", "label": "a"}\n{"txt": "oops", "label": "b"}\n', encoding="utf-8")
    with pytest.raises(ReaderError) as err:
        list(read_task(TaskConfig(kind="jsonl", path=str(f))))
    assert str(err.value) == f"{f}: line 2: missing column 'text'; the columns are ['label', 'txt']"


def test_missing_column_csv_tsv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "c.csv"
    f.write_text("sentence,label\nx,1\n", encoding="utf-8")
    with pytest.raises(ReaderError, match=r"c\.csv: line 1 \(header\): missing column 'text'; "
                                          r"the columns are \['label', 'sentence'\]"):
        list(read_task(TaskConfig(kind="csv", path=str(f))))
    t = tmp_path / "c.tsv"
    t.write_text("text\tlabel\nx\t1\n", encoding="utf-8")
    with pytest.raises(ReaderError, match=r"c\.tsv: .*missing column 'hyp'"):
        list(read_task(TaskConfig(kind="tsv", path=str(t), text_b_column="hyp")))
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"]}), p)
    with pytest.raises(ReaderError, match=r"c\.parquet: missing column 'text'; the columns are \['body'\]"):
        list(read_corpus(CorpusConfig(kind="parquet", path=str(p))))


def test_invalid_utf8_names_file_and_line(tmp_path):
    data = "ok line\nsecond ok\nbad \xff here\n".encode("latin-1")
    for kind, name in (("text", "bad.txt"), ("jsonl", "bad.jsonl")):
        f = write_bytes(tmp_path / name, data if kind == "text" else b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n')
        with pytest.raises(ReaderError, match=rf"{re.escape(name)}: line 3: invalid utf-8 byte 0xff"):
            list(read_corpus(CorpusConfig(kind=kind, path=str(f))))
    f = write_bytes(tmp_path / "whole.txt", data)
    with pytest.raises(ReaderError, match=r"whole\.txt: line 3: invalid utf-8"):
        list(read_corpus(CorpusConfig(kind="text", path=str(f), text_mode="file")))
    c = write_bytes(tmp_path / "bad.csv", b"text,label\nfine,1\nfine,1\nbro\xc3ken,0\n")
    with pytest.raises(ReaderError, match=r"bad\.csv: line 4: invalid utf-8 byte 0xc3"):
        list(read_task(TaskConfig(kind="csv", path=str(c))))


def test_malformed_json_names_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b",}\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"m\.jsonl: line 3: malformed JSON"):
        list(read_corpus(CorpusConfig(kind="jsonl", path=str(f))))
    g = tmp_path / "arr.jsonl"
    g.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"arr\.jsonl: line 1: expected a JSON object, got list"):
        list(read_corpus(CorpusConfig(kind="jsonl", path=str(g))))


def test_corrupt_parquet_and_wiki(tmp_path):
    p = write_bytes(tmp_path / "junk.parquet", b"not parquet at all")
    with pytest.raises(ReaderError, match="junk.parquet: not a readable Parquet file"):
        list(read_corpus(CorpusConfig(kind="parquet", path=str(p))))
    w = write_bytes(tmp_path / "dump.xml.bz2", bz2.compress(b"<mediawiki><page><title>x</title>"))
    with pytest.raises(ReaderError, match=r"dump\.xml\.bz2: not a valid Wikipedia XML dump"):
        list(read_corpus(CorpusConfig(kind="wikipedia_xml", path=str(w))))
    ns = b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n<page>\n<title>x'
    t = write_bytes(tmp_path / "cut.xml.bz2", bz2.compress(ns))
    with pytest.raises(ReaderError, match=r"cut\.xml\.bz2: not a valid Wikipedia XML dump: .*line 3"):
        list(read_corpus(CorpusConfig(kind="wikipedia_xml", path=str(t))))
    only_redirect = ns + b'</title><ns>0</ns><id>5</id><revision><text>#REDIRECT [[y]]</text></revision></page></mediawiki>'
    r = write_bytes(tmp_path / "redir.xml", only_redirect)
    with pytest.raises(ReaderError, match=r"redir\.xml: no articles found"):
        list(read_corpus(CorpusConfig(kind="wikipedia_xml", path=str(r))))


def test_reader_error_is_a_kd_error():
    assert issubclass(ReaderError, KDError)


# ---------------------------------------------------------------- configs and normaliser


@pytest.mark.parametrize("kwargs,field", [
    ({"kind": "csv"}, "kind"),
    ({"kind": "text"}, "path"),  # "default" is only the Wikipedia sample
    ({"kind": "text", "path": "x", "text_mode": "para"}, "text_mode"),
    ({"kind": "jsonl", "path": "x", "max_documents": 0}, "max_documents"),
    ({"kind": "jsonl", "path": "x", "max_documents": True}, "max_documents"),
    ({"kind": "jsonl", "path": "x", "split": "train"}, "split"),
    ({"kind": "jsonl", "path": "x", "text_column": ""}, "text_column"),
    ({"kind": "text", "path": "x", "encoding": "no-such-codec"}, "encoding"),
    ({"kind": "parquet", "path": "x", "encoding": "latin-1"}, "encoding"),
])
def test_corpus_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        CorpusConfig(**kwargs)


def test_normalize_text():
    decomposed = "Cafe\u0301"  # e + combining acute -> é (NFC)
    assert normalize_text(decomposed) == "Caf\u00e9"
    assert len(normalize_text(decomposed)) == 4
    assert normalize_text("  a\t\tb\n\n c\u00a0d \r\n") == "a b c d"
    assert normalize_text("x\x00y\x07z\ufeff\u200bw\x85v") == "xyzw v"  # NEL (\x85) is whitespace
    assert normalize_text("zero\u200djoiner") == "zero\u200djoiner"  # ZWJ kept (emoji, Indic scripts)
    assert normalize_text("") == ""
    with pytest.raises(TypeError):
        normalize_text(None)  # type: ignore[arg-type]


