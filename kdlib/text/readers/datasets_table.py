"""One reader for tables in the formats `datasets` reads, for corpora and task sets alike.

A CSV or JSON (lines or one array) file is loaded by `datasets.load_dataset("csv" | "json")` once into an Arrow
file under our own cache (`$KDLIB_CACHE_DIR/datasets`, else `~/.cache/kdlib/datasets`), which later reads map; a
folder written by `save_to_disk` is mapped by `load_from_disk` (`split` picks a DatasetDict's part); Parquet is
already columnar, so its record batches are read by pyarrow directly (datasets' Parquet builder would only copy it
into the cache). Nothing here reaches the network: packaged builders over local files need no hub (the tests read
with HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 and sockets refused). CSV cells are read as strings with NA
detection off, so a text `NA` or `null` stays text. Rows come as `records.Row`s, `row <k>` from 0: ids
`<file>:<k>`, `<folder>[:<split>]:<k>`; errors name the file and the row, line or column.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from kdlib.errors import ReaderError
from kdlib.runtime.jsonl import json_document, json_objects
from kdlib.text.readers import records
from kdlib.text.readers.lines import check_encoding, iter_lines

SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # a folder: "disk"
TABLE_FORMATS = ("csv", "json", "parquet", "disk")
_BATCH_ROWS = 1024  # rows per Arrow batch: bounded memory for arbitrarily large tables


def datasets_cache_dir() -> Path:
    """Where the Arrow copies of CSV/JSON tables go: beside the other kdlib caches (kdlib.runtime.fingerprints)."""
    root = os.environ.get("KDLIB_CACHE_DIR") or os.path.join(Path.home(), ".cache", "kdlib")
    return Path(root) / "datasets"


def check_table_config(path: str, split: Optional[str], encoding: str, split_field: str) -> None:
    """Config-time checks of a `kind: datasets` input (ValueError naming the field), as far as the path's name
    tells the format: a split only for a saved folder, an encoding other than UTF-8 only for CSV and JSON."""
    if split is not None and (not isinstance(split, str) or not split):
        raise ValueError(f"{split_field}: expected null or a non-empty string, got {split!r}")
    fmt = SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if split is not None and fmt is not None:
        raise ValueError(f"{split_field}: expected null for a {fmt} file (only a folder saved with save_to_disk "
                         f"has splits), got {split!r}")
    if fmt == "parquet" and check_encoding(encoding) != "utf-8":
        raise ValueError(f"encoding: expected 'utf-8' for a Parquet file (the format fixes its own encoding), "
                         f"got {encoding!r}")


def table_format(path: Path) -> str:
    """The format a path holds: a folder is a saved dataset, a file's suffix names its format."""
    if path.is_dir():
        return "disk"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ReaderError(f"{path}: expected a file named *.csv, *.json, *.jsonl or *.parquet, or a folder written "
                          f"by save_to_disk (the format comes from the path), got suffix {path.suffix!r}")
    return fmt


def table_rows(path: Path, columns: Sequence[str], fmt: Optional[str] = None, split: Optional[str] = None,
               encoding: str = "utf-8", hint: str = "") -> Iterator[records.Row]:
    """The table's rows with only `columns`, in file order. `fmt`: one of TABLE_FORMATS (None: from the path);
    `split`: a DatasetDict's part (saved folders only); `encoding`: of CSV/JSON text; `hint`: appended to an
    undecodable-byte error (what to set). An input without rows is refused ("empty input")."""
    fmt = fmt or table_format(path)
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"table_rows: fmt must be one of {TABLE_FORMATS}, got {fmt!r}")
    if fmt != "disk" and path.is_dir():
        raise ReaderError(f"{path}: expected a {fmt} file, got a directory")
    if split is not None and fmt != "disk":
        raise ReaderError(f"{path}: split {split!r} given, but only a folder saved with save_to_disk has splits")
    if fmt in ("parquet", "disk") and check_encoding(encoding) != "utf-8":
        raise ReaderError(f"{path}: encoding {encoding!r} given, but {fmt} data carries its own")
    if fmt == "parquet":
        return _counted(path, parquet_rows(path, columns))
    return _counted(path, _dataset_rows(path, fmt, columns, split, encoding, hint))


def _counted(path: Path, rows: Iterator[records.Row]) -> Iterator[records.Row]:
    count = 0
    for row in rows:
        count += 1
        yield row
    if count == 0:
        raise ReaderError(f"{path}: empty input: no rows (expected at least one)")


def parquet_rows(path: Path, columns: Sequence[str]) -> Iterator[records.Row]:
    """Parquet read in Arrow record batches (never the whole table); id `<name>:<row>`, row from 0."""
    # pyarrow: ~0.3 s to import; data_pipeline's --help imports this module without it
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ReaderError(f"{path}: not a readable Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    for col in columns:
        if col not in names:
            raise records.missing_column(path, None, col, names)
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=list(columns)):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            yield f"{path.name}:{row}", f"row {row}", {c: data[c][i] for c in columns}
            row += 1


def _dataset_rows(path: Path, fmt: str, columns: Sequence[str], split: Optional[str], encoding: str,
                  hint: str) -> Iterator[records.Row]:
    if fmt == "disk":
        ds, prefix = saved_dataset(path, split)
    else:
        ds, prefix = load_file(path, fmt, columns, encoding, hint), path.name
    for col in columns:
        if col not in ds.column_names:
            raise records.missing_column(path, None, col, ds.column_names)
    row, batches = 0, ds.select_columns(list(columns)).iter(batch_size=_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except UnicodeDecodeError as exc:  # pyarrow's JSON reader keeps invalid UTF-8; decoding a cell finds it
            if fmt != "disk":
                _pinpoint(path, fmt, encoding, hint)
            raise ReaderError(f"{path}: rows from {row}: invalid UTF-8 in the data ({exc.reason})") from None
        if batch is None:
            return
        for i in range(len(batch[columns[0]])):
            yield f"{prefix}:{row}", f"row {row}", {c: batch[c][i] for c in columns}
            row += 1


def saved_dataset(path: Path, split: Optional[str]):
    """(Dataset, id prefix) of a folder saved with `save_to_disk`; a DatasetDict needs `split` unless it has one.
    Only that split's folder is mapped (the others may be large, or empty, which datasets cannot load)."""
    import datasets  # ~1.5 s to import; config validation and the other readers must not load it

    folder, prefix = path, path.name
    if (path / "dataset_dict.json").is_file():
        splits = json_document(path / "dataset_dict.json", hint="").get("splits")
        if not isinstance(splits, list):
            raise ReaderError(f"{path / 'dataset_dict.json'}: expected a list under 'splits', got {splits!r}")
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None or split not in splits:
            wanted = "split: expected one of" if split is None else f"split {split!r} not found; the splits are"
            raise ReaderError(f"{path}: {wanted} {splits}")
        folder, prefix = path / split, f"{path.name}:{split}"
    elif split is not None and (path / "state.json").is_file():
        raise ReaderError(f"{path}: split {split!r} given, but this is a single Dataset, not a DatasetDict")
    if (folder / "state.json").is_file() and json_document(folder / "state.json", hint="").get("_data_files") == []:
        raise ReaderError(f"{folder}: empty input: a saved dataset without rows (expected at least one)")
    try:
        ds = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ReaderError(f"{path}: not a dataset saved with save_to_disk: {exc}") from None
    if not isinstance(ds, datasets.Dataset):
        raise ReaderError(f"{folder}: expected a saved Dataset, got a {type(ds).__name__}")
    return ds, prefix


def load_file(path: Path, fmt: str, columns: Sequence[str], encoding: str, hint: str = ""):
    """The CSV or JSON file as a `datasets.Dataset` (CSV: only `columns`, as strings), built into our cache once."""
    if fmt == "csv":
        header = _csv_header(path, encoding, hint)
        for column in columns:
            if column not in header:
                raise records.missing_column(path, None, column, header)
    else:
        _require_content(path)
    import datasets  # ~1 s to import; config validation and the other readers must not load it

    options = dict(encoding=encoding)
    if fmt == "csv":
        strings = datasets.Features({c: datasets.Value("string") for c in columns})
        options.update(usecols=list(columns), features=strings, keep_default_na=False, na_filter=False)
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=str(datasets_cache_dir()),
                                     **options)
    except Exception as exc:  # datasets wraps pandas', pyarrow's and the codec's errors in its own: name the line
        _pinpoint(path, fmt, encoding, hint)
        raise ReaderError(f"{path}: datasets' {fmt} loader failed: {type(exc).__name__}: {exc}") from None


def _require_content(path: Path) -> None:
    with open(path, "rb") as fh:
        if not any(line.strip() for line in fh):
            raise ReaderError(f"{path}: empty input: no rows (expected at least one)")


def _csv_header(path: Path, encoding: str, hint: str) -> list[str]:
    """The header row's column names (the first physical line only: later lines may not decode). A file with no
    data row after it is refused here (datasets' own error for it does not say so)."""
    with open(path, "rb") as fh:
        first = fh.readline()
        more = any(line.strip() for line in fh)
    try:
        line = first.decode(encoding).lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise ReaderError(f"{path}: line 1: invalid {encoding} byte 0x{first[exc.start]:02x} in the header; "
                          f"expected {encoding} text (set `encoding`){hint}") from None
    if not line.strip():
        raise ReaderError(f"{path}: empty input: expected a header row naming the columns")
    if not more:
        raise ReaderError(f"{path}: empty input: no rows after the header (expected at least one)")
    return next(csv.reader([line]))


def _pinpoint(path: Path, fmt: str, encoding: str, hint: str) -> None:
    """After a loader failure: raise the line-level error our own readers give for it (undecodable bytes, a
    malformed JSON line or document), if there is one; return when they find nothing wrong."""
    try:
        first = ""
        for _, line in iter_lines(path, encoding):
            first = first or line.strip()
    except ReaderError as err:
        raise ReaderError(f"{err}{hint}") from None
    if fmt == "json" and first.startswith("["):
        json_document(path, expect=list, encoding=encoding, hint="")
    elif fmt == "json":
        for _ in json_objects(path, lines=iter_lines(path, encoding)):
            pass
