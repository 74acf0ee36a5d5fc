"""Labelled task sets (CSV, TSV, JSONL, fastText `__label__` lines, word-analogy files) for task-specific
distillation."""

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from kdlib.errors import ReaderError
from kdlib.text.readers import records
from kdlib.text.readers.documents import Example
from kdlib.text.readers.lines import check_encoding, iter_lines
from kdlib.text.readers.paths import resolve_path

TASK_KINDS = ("csv", "tsv", "jsonl", "fasttext", "analogy")
FASTTEXT_PREFIX = "__label__"


@dataclass
class TaskConfig:
    """Which labelled file to read and which columns hold text and label; see `read_task`."""

    kind: Literal["csv", "tsv", "jsonl", "fasttext", "analogy"]  # input format (analogy: `: section` headers, then
    #                                                               `a b c d` lines; the label is the section)
    path: str  # file path, or `gensim:<name>` for gensim test data (e.g. gensim:pang_lee_polarity.cor)
    text_column: str = "text"  # column/key with the (first) text segment (csv, tsv, jsonl)
    label_column: str = "label"  # column/key with the label, kept as written (csv, tsv, jsonl)
    text_b_column: Optional[str] = None  # column/key with the second segment of pair tasks, or None
    id_column: Optional[str] = None  # column/key holding each example's id (None: `<file name>:<line>`)
    max_examples: Optional[int] = None  # stop after this many examples (None = all)
    encoding: str = "utf-8"  # text encoding of the file; gensim:pang_lee_polarity.cor needs "cp1252"

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind: expected one of {TASK_KINDS}, got {self.kind!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path: expected a non-empty string, got {self.path!r}")
        for name in ("text_column", "label_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if self.text_b_column is not None and (not isinstance(self.text_b_column, str) or not self.text_b_column):
            raise ValueError(f"text_b_column: expected null or a non-empty string, got {self.text_b_column!r}")
        if self.id_column is not None and (self.kind == "fasttext" or not isinstance(self.id_column, str)
                                           or not self.id_column):
            raise ValueError(f"id_column: expected null, or a column name for kind csv, tsv or jsonl, got "
                             f"{self.id_column!r} for kind {self.kind!r}")
        if self.kind in ("fasttext", "analogy") and self.text_b_column is not None:
            raise ValueError(f"text_b_column: expected null for kind 'fasttext' (one text per line), "
                             f"got {self.text_b_column!r}")
        cols = [self.text_column, self.label_column] + ([self.text_b_column] if self.text_b_column else []) \
            + ([self.id_column] if self.id_column else [])
        if len(set(cols)) != len(cols):
            raise ValueError(f"label_column: expected text, label, text_b and id columns to differ, got {cols}")
        check_encoding(self.encoding)
        if self.max_examples is not None and (
            isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 1
        ):
            raise ValueError(f"max_examples: expected null or an integer >= 1, got {self.max_examples!r}")


def label_number(label: str) -> Optional[float]:
    """A regression label as a finite float, or None when it is not one (the callers name the example)."""
    try:
        value = float(label)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_fasttext(path: Path, encoding: str = "utf-8") -> Iterator[Example]:
    """fastText lines `__label__pos some text` (several labels: the first is used); id `<name>:<line>`."""
    count = 0
    for lineno, line in iter_lines(path, encoding):
        if not line.strip():
            continue
        label_token, _, text = line.strip().partition(" ")
        label = label_token[len(FASTTEXT_PREFIX):]
        if not label_token.startswith(FASTTEXT_PREFIX) or not label:
            raise ReaderError(f"{path}: line {lineno}: expected a line starting `__label__<label> `, "
                              f"got {line[:40]!r}")
        # Further `__label__x` tokens (multi-label lines) are not part of the text.
        words = text.split(" ")
        while words and words[0].startswith(FASTTEXT_PREFIX):
            words.pop(0)
        text = " ".join(words).strip()
        if not text:
            raise ReaderError(f"{path}: line {lineno}: label {label!r} has no text after it")
        count += 1
        yield Example(id=f"{path.name}:{lineno}", text=text, label=label)
    if count == 0:
        raise ReaderError(f"{path}: empty input: no `__label__` lines (expected at least one example)")


def read_analogy(path: Path, encoding: str = "utf-8") -> Iterator[Example]:
    """A word-analogy file (word2vec's questions-words.txt): the text is a line's four words, the label its
    `: section` (the relation: capital-world, family, gram3-comparative, ...).

    The examples come round-robin over the sections, each section's lines in a seeded random order, so that
    max_examples takes a balanced sample spread over each whole section rather than its first lines."""
    sections: dict[str, list[Example]] = {}
    current = None
    for lineno, line in iter_lines(path, encoding):
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            current = line[1:].strip()
            sections.setdefault(current, [])
            continue
        if current is None or len(line.split()) != 4:
            raise ReaderError(f"{path}: line {lineno}: expected a `: section` header before four words per line, "
                              f"got {line[:40]!r}")
        sections[current].append(Example(id=f"{path.name}:{lineno}", text=line, label=current))
    if not any(sections.values()):
        raise ReaderError(f"{path}: empty input: no analogy lines under a `: section` header")
    orders = [[rows[i] for i in np.random.Generator(np.random.PCG64(0)).permutation(len(rows))]
              for rows in sections.values()]
    for round_ in range(max(len(o) for o in orders)):
        for order in orders:
            if round_ < len(order):
                yield order[round_]


def _column_examples(rows: Iterator[records.Row], path: Path, cfg: TaskConfig) -> Iterator[Example]:
    """Examples of CSV/TSV/JSONL rows. Ids under `id_column` are compared as the text they become (7 and "7" are
    one id): a repeated one is refused naming both lines, since later stages key predictions and folds by id.
    Memory: one entry per id read (the id and where it was first seen)."""
    count = 0
    seen: dict[str, str] = {}
    for rid, where, values in rows:
        text = records.as_text(values[cfg.text_column], path, where, cfg.text_column)
        label = records.as_text(values[cfg.label_column], path, where, cfg.label_column, numbers_ok=True)
        if not label.strip():
            raise ReaderError(f"{path}: {where}: column {cfg.label_column!r}: expected a label, got an empty value")
        text_b = None
        if cfg.text_b_column is not None:
            text_b = records.as_text(values[cfg.text_b_column], path, where, cfg.text_b_column)
        if cfg.id_column is not None:
            rid = records.as_text(values[cfg.id_column], path, where, cfg.id_column, numbers_ok=True)
            if rid in seen:
                raise ReaderError(f"{path}: {where}: id_column {cfg.id_column!r}: id {rid!r} already used on "
                                  f"{seen[rid]}")
            seen[rid] = where
        count += 1
        yield Example(id=rid, text=text, label=label, text_b=text_b)
    if count == 0:
        raise ReaderError(f"{path}: empty input: no rows (expected at least one example)")


def read_task(cfg: TaskConfig) -> Iterator[Example]:
    """Stream the labelled Examples `cfg` describes; labels stay strings as written in the file.

    Raises ReaderError naming the file and line/column for missing, empty or malformed input.
    """
    path = resolve_path(cfg.path)
    if path.is_dir():
        raise ReaderError(f"{path}: expected a {cfg.kind} file, got a directory")
    if cfg.kind == "fasttext":
        examples = read_fasttext(path, cfg.encoding)
    elif cfg.kind == "analogy":
        examples = read_analogy(path, cfg.encoding)
    else:
        columns = [cfg.text_column, cfg.label_column] + ([cfg.text_b_column] if cfg.text_b_column else []) \
            + ([cfg.id_column] if cfg.id_column else [])
        if cfg.kind == "jsonl":
            rows = records.jsonl_rows(path, columns, cfg.encoding)
        else:
            rows = records.delimited_rows(path, columns, "," if cfg.kind == "csv" else "\t", cfg.encoding)
        examples = _column_examples(rows, path, cfg)
    return itertools.islice(examples, cfg.max_examples) if cfg.max_examples is not None else examples
