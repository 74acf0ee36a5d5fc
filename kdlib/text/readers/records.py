"""Row-oriented inputs (JSONL, CSV/TSV here; Parquet and `datasets` tables in datasets_table) as (id, where,
columns) triples.

Corpus and task readers share this so that every format reports a missing column, a bad line or a
null value the same way: file name, line/row, the column, and the columns that do exist.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from kdlib.errors import ReaderError
from kdlib.text.readers.lines import iter_lines
from kdlib.runtime.jsonl import json_objects

Row = tuple[str, str, dict[str, Any]]  # (record id, "line 7" / "row 3", {column: value})


def missing_column(path: Path, where: Optional[str], column: str, existing: Sequence[str]) -> ReaderError:
    at = f" {where}:" if where else ""
    return ReaderError(f"{path}:{at} missing column {column!r}; the columns are {sorted(existing)}")


def as_text(value: Any, path: Path, where: str, column: str, numbers_ok: bool = False) -> str:
    """A cell as str. Text columns must hold strings; label columns may hold numbers/booleans."""
    if isinstance(value, str):
        return value
    if numbers_ok and isinstance(value, bool):
        return "true" if value else "false"
    if numbers_ok and isinstance(value, int):
        return str(value)
    if numbers_ok and isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    got = "null" if value is None else type(value).__name__
    kind = "a string or a number" if numbers_ok else "a string"
    raise ReaderError(f"{path}: {where}: column {column!r}: expected {kind}, got {got}")


def jsonl_rows(path: Path, columns: Sequence[str], encoding: str = "utf-8") -> Iterator[Row]:
    """One JSON object per line (blank lines skipped); id `<name>:<line>`."""
    for lineno, obj in json_objects(path, lines=iter_lines(path, encoding)):
        where = f"line {lineno}"
        for col in columns:
            if col not in obj:
                raise missing_column(path, where, col, list(obj))
        yield f"{path.name}:{lineno}", where, {c: obj[c] for c in columns}


def _csv_lines(path: Path, holder: list[int], encoding: str) -> Iterator[str]:
    for lineno, line in iter_lines(path, encoding):
        holder[0] = lineno
        yield line + "\n"


def delimited_rows(path: Path, columns: Sequence[str], delimiter: str, encoding: str = "utf-8") -> Iterator[Row]:
    """CSV (`,`, RFC-4180 quoting) or TSV (tab, no quoting, as GLUE files are) with a header row;
    id `<name>:<line>` where line is the record's first physical line."""
    current = [0]
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(_csv_lines(path, current, encoding), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ReaderError(f"{path}: empty input: expected a header row naming the columns")
        for col in columns:
            if col not in header:
                raise missing_column(path, "line 1 (header)", col, header)
        index = {c: header.index(c) for c in columns}
        start = current[0] + 1
        for row in reader:
            where = f"line {start}"
            if row:  # blank lines are skipped
                if len(row) != len(header):
                    raise ReaderError(f"{path}: {where}: expected {len(header)} fields like the header, "
                                      f"got {len(row)}")
                yield f"{path.name}:{start}", where, {c: row[i] for c, i in index.items()}
            start = current[0] + 1
    except csv.Error as exc:
        raise ReaderError(f"{path}: line {current[0]}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: "
                          f"{exc}") from None
