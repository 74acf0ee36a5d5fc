"""The one table reader (kdlib.text.readers.datasets_table) behind `kind: datasets` corpora and task sets, and the
parquet / hf_disk corpus kinds and whole-table task reads: the same rows written as CSV, JSON lines, a JSON array,
Parquet, a saved Dataset and a saved DatasetDict read back equal; errors name the file and the line or column;
nothing reaches the network."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kdlib.config import load_config, to_dict
from kdlib.errors import ConfigError, ReaderError
from kdlib.tasks.readers import TaskConfig, drop_unset_additions, read_table_task, read_task
from kdlib.text.readers import CorpusConfig, Document, Example, read_corpus
from kdlib.text.readers.datasets_table import table_rows

REPO = Path(__file__).resolve().parents[3]
ROWS = [  # every value a string, so each format holds exactly these values
    {"id": "a1", "text": "first text, with a comma", "text_b": "pair one", "label": "pos", "extra": "x"},
    {"id": "a2", "text": "NA", "text_b": 'a "quoted" word', "label": "neg", "extra": "y"},
    {"id": "a3", "text": "na\u00efve caf\u00e9 \u2014 two\nlines", "text_b": "null", "label": "pos", "extra": ""},
]
OTHER = [{"id": "b1", "text": "held out", "text_b": "b", "label": "neg", "extra": "z"}]
COLUMNS = ["text", "label", "text_b", "id"]
# format -> (file or folder name, split, id prefix)
FORMATS = {"csv": ("t.csv", None, "t.csv"), "jsonl": ("t.jsonl", None, "t.jsonl"), "json": ("t.json", None, "t.json"),
           "parquet": ("t.parquet", None, "t.parquet"), "disk": ("saved", None, "saved"),
           "dict": ("saved_dict", "train", "saved_dict:train")}


def write_table(folder: Path, fmt: str, rows: list[dict], other: list[dict] = OTHER) -> Path:
    """`rows` written in format `fmt` under `folder` (a DatasetDict: `rows` as its train split, `other` as test)."""
    path = folder / FORMATS[fmt][0]
    if fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if fmt == "dict":
            ds = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(other)})
        ds.save_to_disk(str(path))
    return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to resolve a host or open an internet socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- the same rows from every format


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_yields_exactly_the_rows(tmp_path, fmt):
    name, split, prefix = FORMATS[fmt]
    path = write_table(tmp_path, fmt, ROWS)
    rows = list(table_rows(path, COLUMNS, split=split))
    assert [values for _, _, values in rows] == [{c: r[c] for c in COLUMNS} for r in ROWS]
    assert [(rid, where) for rid, where, _ in rows] == [(f"{prefix}:{k}", f"row {k}") for k in range(len(ROWS))]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_task_reads_the_rows_as_examples(tmp_path, fmt):
    name, split, _ = FORMATS[fmt]
    path = write_table(tmp_path, fmt, ROWS)
    cfg = TaskConfig(kind="datasets", path=str(path), text_b_column="text_b", id_column="id", dataset_split=split)
    assert list(read_task(cfg)) == [Example(r["id"], r["text"], r["label"], r["text_b"]) for r in ROWS]
    no_ids = list(read_task(TaskConfig(kind="datasets", path=str(path), dataset_split=split, max_examples=2)))
    assert no_ids == [Example(f"{FORMATS[fmt][2]}:{k}", r["text"], r["label"]) for k, r in enumerate(ROWS[:2])]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_corpus_reads_the_rows_as_documents(tmp_path, fmt):
    name, split, prefix = FORMATS[fmt]
    path = write_table(tmp_path, fmt, ROWS)
    docs = list(read_corpus(CorpusConfig(kind="datasets", path=str(path), split=split)))
    assert docs == [Document(f"{prefix}:{k}", r["text"]) for k, r in enumerate(ROWS)]
    bodies = list(read_corpus(CorpusConfig(kind="datasets", path=str(path), split=split, text_column="text_b")))
    assert [d.text for d in bodies] == [r["text_b"] for r in ROWS]


def test_a_dataset_dict_reads_the_split_asked_for(tmp_path):
    path = write_table(tmp_path, "dict", ROWS)
    task = TaskConfig(kind="datasets", path=str(path), id_column="id", dataset_split="test")
    assert list(read_task(task)) == [Example("b1", "held out", "neg")]
    assert list(read_corpus(CorpusConfig(kind="datasets", path=str(path), split="test"))) == [
        Document("saved_dict:test:0", "held out")]
    with pytest.raises(ReaderError, match=r"saved_dict: split: expected one of \['train', 'test'\]"):
        list(read_task(TaskConfig(kind="datasets", path=str(path))))
    with pytest.raises(ReaderError, match=r"saved_dict: split 'dev' not found; the splits are \['train', 'test'\]"):
        list(read_corpus(CorpusConfig(kind="datasets", path=str(path), split="dev")))


def test_the_existing_corpus_kinds_go_through_the_same_reader(tmp_path):
    parquet, saved = write_table(tmp_path, "parquet", ROWS), write_table(tmp_path, "disk", ROWS)
    for kind, path in (("parquet", parquet), ("hf_disk", saved)):
        assert list(read_corpus(CorpusConfig(kind=kind, path=str(path)))) == \
            list(read_corpus(CorpusConfig(kind="datasets", path=str(path))))


def test_whole_table_options_read_any_format(tmp_path):
    # Confidences as a CSV holds them (text) and as typed JSON / Parquet values (numbers, null for none).
    typed = [dict(r, conf=c) for r, c in zip(ROWS + OTHER, [0.9, None, 0.5, 1])]
    text = [dict(r, conf="" if c is None else str(c)) for r, c in zip(ROWS + OTHER, [0.9, None, 0.5, 1])]
    opts = dict(confidence_column="conf", normalise="tweet", dedupe=True, split_fractions={
        "train": 0.5, "dev": 0.25, "test": 0.25})
    want, _ = read_table_task(TaskConfig(kind="csv", path=str(write_table(tmp_path, "csv", text)), **opts))
    assert [e.id for e in want] == ["t.csv:row0", "t.csv:row1", "t.csv:row2", "t.csv:row3"]  # kind csv: as before
    assert [e.confidence for e in want] == [0.9, None, 0.5, 1.0]
    for fmt in ("csv", "jsonl", "parquet"):
        got, stats = read_table_task(TaskConfig(kind="datasets", path=str(write_table(tmp_path, fmt, typed
                                                                                       if fmt != "csv" else text)),
                                                **opts))
        assert [(e.text, e.label, e.confidence, e.split) for e in got] == \
            [(e.text, e.label, e.confidence, e.split) for e in want]
        assert [e.id for e in got] == [f"{FORMATS[fmt][0]}:{k}" for k in range(4)] and stats.rows == 4


# ---------------------------------------------------------------- errors name the file and the line or column


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_missing_column_is_one_error_naming_file_and_column(tmp_path, fmt):
    name, split, _ = FORMATS[fmt]
    path = write_table(tmp_path, fmt, ROWS)
    columns = r"\['extra', 'id', 'label', 'text', 'text_b'\]"
    with pytest.raises(ReaderError, match=rf"{name}: missing column 'topic'; the columns are {columns}$"):
        list(read_task(TaskConfig(kind="datasets", path=str(path), label_column="topic", dataset_split=split)))
    with pytest.raises(ReaderError, match=rf"^{path}: missing column 'body'"):
        list(read_corpus(CorpusConfig(kind="datasets", path=str(path), text_column="body", split=split)))


def test_a_non_utf8_csv_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nplain,pos\n\"caf\u00e9\nau lait\",neg\nna\u00efve,pos\n".encode("latin-1"))
    with pytest.raises(ReaderError, match=r"latin\.csv: line 3: invalid utf-8 byte 0xe9; expected utf-8 text"):
        list(read_task(TaskConfig(kind="datasets", path=str(path))))
    with pytest.raises(ReaderError, match=r"latin\.csv: line 3: invalid utf-8 byte 0xe9"):
        list(read_corpus(CorpusConfig(kind="datasets", path=str(path))))
    assert [e.text for e in read_task(TaskConfig(kind="datasets", path=str(path), encoding="latin-1"))] == [
        "plain", "caf\u00e9\nau lait", "na\u00efve"]
    header = tmp_path / "header.csv"
    header.write_bytes(b"t\xe9xt,label\nx,y\n")
    with pytest.raises(ReaderError, match=r"header\.csv: line 1: invalid utf-8 byte 0xe9 in the header"):
        list(read_task(TaskConfig(kind="datasets", path=str(header))))


def test_bad_json_bytes_and_lines_are_named(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(ReaderError, match=r"latin\.jsonl: line 2: invalid utf-8 byte 0xe9"):
        list(read_corpus(CorpusConfig(kind="datasets", path=str(latin))))
    assert [d.text for d in read_corpus(CorpusConfig(kind="datasets", path=str(latin), encoding="latin-1"))] == [
        "ok", "caf\u00e9"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok", "label": "a"}\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"broken\.jsonl: line 2: malformed JSON"):
        list(read_task(TaskConfig(kind="datasets", path=str(broken))))
    null = tmp_path / "null.jsonl"
    null.write_text('{"text": "ok", "label": "a"}\n{"text": null, "label": "b"}\n', encoding="utf-8")
    with pytest.raises(ReaderError, match=r"null\.jsonl: row 1: column 'text': expected a string, got null"):
        list(read_task(TaskConfig(kind="datasets", path=str(null))))


def test_empty_inputs_and_unknown_suffixes_are_refused(tmp_path):
    for name, data in (("e.csv", b""), ("h.csv", b"text,label\n"), ("e.jsonl", b"\n  \n"), ("e.json", b"")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ReaderError, match=rf"{name}: empty input"):
            list(read_task(TaskConfig(kind="datasets", path=str(path))))
    empty = write_table(tmp_path, "dict", ROWS, other=[])
    with pytest.raises(ReaderError, match=r"saved_dict/test: empty input"):
        list(read_corpus(CorpusConfig(kind="datasets", path=str(empty), split="test")))
    odd = tmp_path / "t.txt"
    odd.write_text("text\nx\n")
    with pytest.raises(ReaderError, match=r"t\.txt: expected a file named \*\.csv, \*\.json, \*\.jsonl or "
                                          r"\*\.parquet, or a folder written by save_to_disk"):
        list(read_corpus(CorpusConfig(kind="datasets", path=str(odd))))
    with pytest.raises(ReaderError, match=r"nope\.csv: no such file"):
        read_corpus(CorpusConfig(kind="datasets", path=str(tmp_path / "nope.csv")))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("cls, kwargs, field", [
    (CorpusConfig, {"kind": "datasets"}, "path"),  # "default" is only the Wikipedia sample
    (CorpusConfig, {"kind": "datasets", "path": "t.csv", "split": "train"}, "split"),
    (CorpusConfig, {"kind": "datasets", "path": "d", "split": ""}, "split"),
    (CorpusConfig, {"kind": "datasets", "path": "t.parquet", "encoding": "latin-1"}, "encoding"),
    (CorpusConfig, {"kind": "datasets", "path": "t.csv", "encoding": "no-such-codec"}, "encoding"),
    (TaskConfig, {"kind": "datasets", "path": "t.jsonl", "dataset_split": "train"}, "dataset_split"),
    (TaskConfig, {"kind": "datasets", "path": "d", "dataset_split": ""}, "dataset_split"),
    (TaskConfig, {"kind": "csv", "path": "d", "dataset_split": "train"}, "dataset_split"),
    (TaskConfig, {"kind": "datasets", "path": "t.parquet", "encoding": "cp1252"}, "encoding"),
    (TaskConfig, {"kind": "datasets", "path": "t.csv", "text_column": "label"}, "label_column"),
])
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        cls(**kwargs)


def test_yaml_configs_and_the_hash_of_older_tasks(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("kind: datasets\npath: data/t.parquet\nlabel_column: topic\ndataset_split: train\n")
    with pytest.raises(ConfigError, match=r"field 'dataset_split': expected null for a parquet file"):
        load_config(path, TaskConfig)
    path.write_text("kind: datasets\npath: data/saved\nlabel_column: topic\ndataset_split: train\n")
    cfg = load_config(path, TaskConfig)
    assert drop_unset_additions(to_dict(cfg))["dataset_split"] == "train"
    assert "dataset_split" not in drop_unset_additions(to_dict(TaskConfig(kind="datasets", path="t.csv")))
    corpus = tmp_path / "corpus.yaml"
    corpus.write_text("kind: datasets\npath: data/saved\ntext_column: body\nsplit: validation\n")
    assert load_config(corpus, CorpusConfig) == CorpusConfig("datasets", "data/saved", "body", split="validation")


# ---------------------------------------------------------------- offline


def test_a_fresh_process_reads_every_format_with_hub_and_datasets_offline(tmp_path):
    """Cold caches, HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 set before `datasets` is imported, and sockets
    refused: every format still reads, through our cache folder."""
    for fmt in FORMATS:
        write_table(tmp_path, fmt, ROWS)
    script = f"""
import socket, sys
def refuse(*a, **k):
    raise SystemExit("network access attempted")
socket.getaddrinfo = socket.create_connection = refuse
from pathlib import Path
from kdlib.text.readers.datasets_table import table_rows
import datasets
assert datasets.config.HF_DATASETS_OFFLINE and datasets.config.HF_HUB_OFFLINE
folder = Path({str(tmp_path)!r})
for name, split in {[(v[0], v[1]) for v in FORMATS.values()]!r}:
    got = [v for _, _, v in table_rows(folder / name, ["text", "label"], split=split)]
    assert got == {[{"text": r["text"], "label": r["label"]} for r in ROWS]!r}, name
print("read", len({list(FORMATS)!r}))
"""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", KDLIB_CACHE_DIR=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf-home"))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"read {len(FORMATS)}"
    assert {p.name for p in (tmp_path / "cache" / "datasets").iterdir()} >= {"csv", "json"}
    assert not (tmp_path / "hf-home").exists()  # nothing written to (or fetched into) the hub's cache
