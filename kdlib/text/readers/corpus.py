"""Unlabelled corpora for distillation: one config type and one dispatcher over every format."""

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

from kdlib.errors import ReaderError
from kdlib.text.readers import records
from kdlib.text.readers.datasets_table import check_table_config, table_rows
from kdlib.text.readers.documents import Document
from kdlib.text.readers.lines import check_encoding
from kdlib.text.readers.paths import DEFAULT_WIKI_NAME, gensim_test_data, resolve_path
from kdlib.text.readers.text import TEXT_MODES, read_text
from kdlib.text.readers.wikipedia import read_wikipedia_xml

CORPUS_KINDS = ("wikipedia_xml", "text", "jsonl", "parquet", "hf_disk", "datasets")


@dataclass
class CorpusConfig:
    """Which corpus to read and how; `read_corpus(cfg)` turns it into a stream of Documents."""

    kind: Literal["wikipedia_xml", "text", "jsonl", "parquet", "hf_disk", "datasets"]  # input format (datasets: a
    #   .csv/.json/.jsonl/.parquet file or a save_to_disk folder, read by datasets_table; the path says which)
    path: str = "default"  # file/folder, `gensim:<name>`, or "default" = gensim's Wikipedia sample (wikipedia_xml only)
    text_column: str = "text"  # column/key holding the text (jsonl, parquet, hf_disk, datasets)
    text_mode: Literal["file", "line", "blank_line"] = "line"  # text kind: one doc per file, line or paragraph
    split: Optional[str] = None  # hf_disk, datasets: split of a saved DatasetDict (may be omitted when it has one)
    max_documents: Optional[int] = None  # stop after this many documents (None = all)
    encoding: str = "utf-8"  # text encoding of text/jsonl/CSV/JSON files (Parquet, HF and XML carry their own)

    def __post_init__(self) -> None:
        if self.kind not in CORPUS_KINDS:
            raise ValueError(f"kind: expected one of {CORPUS_KINDS}, got {self.kind!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path: expected a non-empty string, got {self.path!r}")
        if self.path == "default" and self.kind != "wikipedia_xml":
            raise ValueError(f"path: expected a file or folder ('default' only means the Wikipedia "
                             f"sample, for kind 'wikipedia_xml'), got 'default' with kind {self.kind!r}")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ValueError(f"text_column: expected a non-empty string, got {self.text_column!r}")
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode: expected one of {TEXT_MODES}, got {self.text_mode!r}")
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise ValueError(f"split: expected null or a non-empty string, got {self.split!r}")
        if self.split is not None and self.kind not in ("hf_disk", "datasets"):
            raise ValueError(f"split: expected null for kind {self.kind!r} (only hf_disk and datasets have "
                             f"splits), got {self.split!r}")
        if check_encoding(self.encoding) != "utf-8" and self.kind not in ("text", "jsonl", "datasets"):
            raise ValueError(f"encoding: expected 'utf-8' for kind {self.kind!r} (the format fixes its "
                             f"own encoding), got {self.encoding!r}")
        if self.max_documents is not None and (
            isinstance(self.max_documents, bool) or not isinstance(self.max_documents, int)
            or self.max_documents < 1
        ):
            raise ValueError(f"max_documents: expected null or an integer >= 1, got {self.max_documents!r}")
        if self.kind == "datasets":
            check_table_config(self.path, self.split, self.encoding, "split")


def _column_documents(rows: Iterator[records.Row], path: Path, column: str) -> Iterator[Document]:
    # Rows whose text is empty/whitespace are skipped, like blank lines in text files.
    count = 0
    for rid, where, values in rows:
        text = records.as_text(values[column], path, where, column)
        if text.strip():
            count += 1
            yield Document(id=rid, text=text)
    if count == 0:
        raise ReaderError(f"{path}: empty input: no rows with non-empty {column!r} (expected at least one document)")


def _documents(cfg: CorpusConfig) -> Iterator[Document]:
    if cfg.kind == "wikipedia_xml":
        path = gensim_test_data(DEFAULT_WIKI_NAME) if cfg.path == "default" else resolve_path(cfg.path)
        return read_wikipedia_xml(path)
    path = resolve_path(cfg.path)
    if cfg.kind == "text":
        return read_text(path, cfg.text_mode, cfg.encoding)
    if cfg.kind == "jsonl":
        if path.is_dir():
            raise ReaderError(f"{path}: expected a jsonl file, got a directory")
        rows = records.jsonl_rows(path, [cfg.text_column], cfg.encoding)
    else:  # parquet, hf_disk and datasets: one table reader (kdlib.text.readers.datasets_table)
        fmt = {"parquet": "parquet", "hf_disk": "disk"}.get(cfg.kind)
        rows = table_rows(path, [cfg.text_column], fmt, cfg.split, cfg.encoding)
    return _column_documents(rows, path, cfg.text_column)


def read_corpus(cfg: CorpusConfig) -> Iterator[Document]:
    """Stream the Documents `cfg` describes (ids unique and identical on every run).

    Raises ReaderError (naming the file and line/row/column) for missing, empty or malformed input;
    a missing file is reported immediately, content errors when the stream reaches them.
    """
    docs = _documents(cfg)
    return itertools.islice(docs, cfg.max_documents) if cfg.max_documents is not None else docs
