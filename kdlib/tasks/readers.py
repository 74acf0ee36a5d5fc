"""Labelled task sets (CSV, TSV, JSONL, fastText `__label__` lines, word-analogy files, and any table `datasets`
reads: kdlib.text.readers.datasets_table) for task-specific distillation; sets with copies (tweets) read whole,
de-duplicated and split by a hash (dedupe_split, table)."""

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from kdlib.errors import ReaderError
from kdlib.tasks.dedupe_split import DEFAULT_SPLIT_FRACTIONS, NORMALISERS, SPLITS, DedupeStats, dedupe, split_of
from kdlib.tasks.package_files import PACKAGE_PREFIX, package_file, split_package_ref
from kdlib.tasks.table import read_rows
from kdlib.text.readers import records
from kdlib.text.readers.datasets_table import check_table_config, table_rows
from kdlib.text.readers.documents import Example
from kdlib.text.readers.lines import check_encoding, iter_lines
from kdlib.text.readers.paths import resolve_path

TASK_KINDS = ("csv", "tsv", "jsonl", "fasttext", "analogy", "datasets")
FASTTEXT_PREFIX = "__label__"
# TaskConfig fields added after stages first recorded task hashes, with their defaults: a stage's hash leaves them
# out while they are unset, so what was built before them keeps its hash (see `drop_unset_additions`).
TASK_ADDITIONS = {"normalise": None, "dedupe": False, "split": None, "split_fractions": DEFAULT_SPLIT_FRACTIONS,
                  "confidence_column": None, "min_confidence": None, "dataset_split": None}


@dataclass
class TaskConfig:
    """Which labelled file to read and which columns hold text and label; see `read_task`.

    The whole-table options (normalise, dedupe, split, confidence_column, min_confidence; kind csv or datasets)
    read the file as one table through `datasets` (kdlib.tasks.table), since de-duplication and the hashed split
    need every row.
    """

    kind: Literal["csv", "tsv", "jsonl", "fasttext", "analogy", "datasets"]  # input format (analogy: `: section`
    #   headers, then `a b c d` lines, the label is the section; datasets: a .csv/.json/.jsonl/.parquet file or a
    #   save_to_disk folder, read by kdlib.text.readers.datasets_table, the path says which)
    path: str  # file path, `gensim:<name>` for gensim test data (e.g. gensim:pang_lee_polarity.cor), or
    #            `package:<module>/<path>` for a file inside an installed package (kdlib.tasks.package_files)
    text_column: str = "text"  # column/key with the (first) text segment (csv, tsv, jsonl, datasets)
    label_column: str = "label"  # column/key with the label, kept as written (csv, tsv, jsonl, datasets)
    text_b_column: Optional[str] = None  # column/key with the second segment of pair tasks, or None
    id_column: Optional[str] = None  # column/key holding each example's id (None: `<file name>:<line>`)
    max_examples: Optional[int] = None  # stop after this many examples (None = all)
    encoding: str = "utf-8"  # text encoding of the file; gensim:pang_lee_polarity.cor needs "cp1252"
    normalise: Optional[Literal["tweet"]] = None  # the copy/split key: tweet (lower-case, no RT, @names, links;
    #                                               kdlib.tasks.dedupe_split), or null: the text as written
    dedupe: bool = False  # keep one example per key: majority label, then confidence (dedupe_split.resolve)
    split: Optional[Literal["train", "dev", "test"]] = None  # only this part of the sha256(key) split (null: all)
    split_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS))  # shares of
    #                                               train, dev and test (sum 1); fixed per key, not exact counts
    confidence_column: Optional[str] = None  # column with each row's confidence in [0, 1] (empty: none), kept on
    #                                          the examples (ScoredExample.confidence)
    min_confidence: Optional[float] = None  # drop examples whose (kept row's) confidence is below this or missing
    dataset_split: Optional[str] = None  # kind datasets: the part of a saved DatasetDict to read (null: its only one)

    @property
    def whole_table(self) -> bool:
        """True when the set is read as one table (see the class docstring)."""
        return (self.normalise is not None or self.dedupe or self.split is not None
                or self.confidence_column is not None or self.min_confidence is not None)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind: expected one of {TASK_KINDS}, got {self.kind!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path: expected a non-empty string, got {self.path!r}")
        if self.path.startswith(PACKAGE_PREFIX):
            split_package_ref(self.path)
        for name in ("text_column", "label_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
        if self.text_b_column is not None and (not isinstance(self.text_b_column, str) or not self.text_b_column):
            raise ValueError(f"text_b_column: expected null or a non-empty string, got {self.text_b_column!r}")
        if self.id_column is not None and (self.kind == "fasttext" or not isinstance(self.id_column, str)
                                           or not self.id_column):
            raise ValueError(f"id_column: expected null, or a column name for kind csv, tsv, jsonl or datasets, got "
                             f"{self.id_column!r} for kind {self.kind!r}")
        if self.kind in ("fasttext", "analogy") and self.text_b_column is not None:
            raise ValueError(f"text_b_column: expected null for kind 'fasttext' (one text per line), "
                             f"got {self.text_b_column!r}")
        cols = [self.text_column, self.label_column] + [c for c in (self.text_b_column, self.id_column,
                                                                     self.confidence_column) if c]
        if len(set(cols)) != len(cols):
            raise ValueError(f"label_column: expected text, label, text_b, id and confidence columns to differ, "
                             f"got {cols}")
        check_encoding(self.encoding)
        if self.max_examples is not None and (
            isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 1
        ):
            raise ValueError(f"max_examples: expected null or an integer >= 1, got {self.max_examples!r}")
        if self.kind == "datasets":
            check_table_config(self.path, self.dataset_split, self.encoding, "dataset_split")
        elif self.dataset_split is not None:
            raise ValueError(f"dataset_split: expected null for kind {self.kind!r} (only kind datasets reads a saved "
                             f"DatasetDict), got {self.dataset_split!r}")
        self._check_whole_table()

    def _check_whole_table(self) -> None:
        if self.normalise is not None and self.normalise not in NORMALISERS:
            raise ValueError(f"normalise: expected null or one of {NORMALISERS}, got {self.normalise!r}")
        if not isinstance(self.dedupe, bool):
            raise ValueError(f"dedupe: expected true or false, got {self.dedupe!r}")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split: expected null or one of {SPLITS}, got {self.split!r}")
        fr = self.split_fractions
        if (not isinstance(fr, dict) or set(fr) != set(SPLITS)
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in fr.values())
                or abs(sum(fr.values()) - 1.0) > 1e-9):
            raise ValueError(f"split_fractions: expected {{train, dev, test}} numbers in [0, 1] summing to 1, "
                             f"got {fr!r}")
        if self.split is not None and fr[self.split] == 0:
            raise ValueError(f"split_fractions: expected a share above 0 for split {self.split!r}, got {fr!r}")
        if self.confidence_column is not None and (not isinstance(self.confidence_column, str)
                                                   or not self.confidence_column):
            raise ValueError(f"confidence_column: expected null or a column name, got {self.confidence_column!r}")
        if self.min_confidence is not None:
            if isinstance(self.min_confidence, bool) or not isinstance(self.min_confidence, (int, float)) \
                    or not 0 <= self.min_confidence <= 1:
                raise ValueError(f"min_confidence: expected null or a number in [0, 1], got {self.min_confidence!r}")
            if self.confidence_column is None:
                raise ValueError("min_confidence: expected confidence_column to name the column it filters on, "
                                 "got confidence_column null")
        if self.whole_table and self.kind not in ("csv", "datasets"):
            raise ValueError(f"kind: expected 'csv' or 'datasets' with normalise, dedupe, split, confidence_column "
                             f"or min_confidence (read whole through datasets), got {self.kind!r}")
        if self.whole_table and self.text_b_column is not None:
            raise ValueError(f"text_b_column: expected null with normalise, dedupe, split, confidence_column or "
                             f"min_confidence (the copy key is one text), got {self.text_b_column!r}")


@dataclass(frozen=True)
class ScoredExample(Example):
    """An Example of a whole-table read: with its row's confidence and the hashed split of its key."""

    confidence: Optional[float] = None  # the kept row's confidence (None: none in the file)
    split: Optional[str] = None  # train, dev or test: split_of(its key), whichever split was asked for


def drop_unset_additions(task: dict) -> dict:
    """`task` (a TaskConfig as plain data: kdlib.config.to_dict) less the TASK_ADDITIONS left at their defaults."""
    return {k: v for k, v in task.items() if k not in TASK_ADDITIONS or v != TASK_ADDITIONS[k]}


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
    """Examples of CSV/TSV/JSONL/datasets rows. Ids under `id_column` are compared as the text they become (7 and
    "7" are one id): a repeated one is refused naming both lines, since later stages key predictions and folds by
    id. Memory: one entry per id read (the id and where it was first seen)."""
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


def _task_path(cfg: TaskConfig) -> Path:
    path = package_file(cfg.path) if cfg.path.startswith(PACKAGE_PREFIX) else resolve_path(cfg.path)
    if path.is_dir() and cfg.kind != "datasets":  # a datasets folder: one saved with save_to_disk
        raise ReaderError(f"{path}: expected a {cfg.kind} file, got a directory")
    return path


def read_table_task(cfg: TaskConfig) -> tuple[list[ScoredExample], DedupeStats]:
    """The whole-table read (`cfg.whole_table`): rows -> key (normalise) -> one example per key (dedupe) ->
    min_confidence on the kept row -> the asked split; and what de-duplication did. Examples keep the text, id
    and confidence of their kept row, in file order. max_examples is not applied here (read_task applies it)."""
    path = _task_path(cfg)
    csv_kind = cfg.kind == "csv"  # kind csv: whatever the file's name, with the ids it always had
    rows = read_rows(path, cfg.text_column, cfg.label_column, cfg.confidence_column, cfg.id_column, cfg.encoding,
                     fmt="csv" if csv_kind else None, split=cfg.dataset_split, row_ids=csv_kind)
    groups, stats = dedupe(rows, cfg.normalise, keep_all=not cfg.dedupe)
    out = []
    for group in groups:
        row = group.row
        if cfg.min_confidence is not None and (row.confidence is None or row.confidence < cfg.min_confidence):
            continue
        part = split_of(group.key, cfg.split_fractions)
        if cfg.split is None or part == cfg.split:
            out.append(ScoredExample(id=row.id, text=row.text, label=row.label, confidence=row.confidence,
                                     split=part))
    if not out:
        raise ReaderError(f"{path}: no examples left after min_confidence {cfg.min_confidence} and split "
                          f"{cfg.split!r} (of {stats.groups} read)")
    return out, stats


def read_task(cfg: TaskConfig) -> Iterator[Example]:
    """Stream the labelled Examples `cfg` describes; labels stay strings as written in the file.

    Raises ReaderError naming the file and line/column for missing, empty or malformed input.
    """
    if cfg.whole_table:
        examples: Iterator[Example] = iter(read_table_task(cfg)[0])
        return itertools.islice(examples, cfg.max_examples) if cfg.max_examples is not None else examples
    path = _task_path(cfg)
    if cfg.kind == "fasttext":
        examples = read_fasttext(path, cfg.encoding)
    elif cfg.kind == "analogy":
        examples = read_analogy(path, cfg.encoding)
    else:
        columns = [cfg.text_column, cfg.label_column] + ([cfg.text_b_column] if cfg.text_b_column else []) \
            + ([cfg.id_column] if cfg.id_column else [])
        if cfg.kind == "datasets":
            rows = table_rows(path, columns, None, cfg.dataset_split, cfg.encoding)
        elif cfg.kind == "jsonl":
            rows = records.jsonl_rows(path, columns, cfg.encoding)
        else:
            rows = records.delimited_rows(path, columns, "," if cfg.kind == "csv" else "\t", cfg.encoding)
        examples = _column_examples(rows, path, cfg)
    return itertools.islice(examples, cfg.max_examples) if cfg.max_examples is not None else examples
