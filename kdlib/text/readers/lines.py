"""Streaming, strictly-decoded line access: every reader gets the file name and line number for free."""
from __future__ import annotations

import bz2
import codecs
import gzip
from pathlib import Path
from typing import BinaryIO, Iterator

from kdlib.errors import ReaderError


def open_binary(path: Path) -> BinaryIO:
    """Open `path` for reading bytes, transparently decompressing `.gz` / `.bz2`."""
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        if path.suffix == ".bz2":
            return bz2.open(path, "rb")
        return open(path, "rb")
    except FileNotFoundError:
        raise ReaderError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReaderError(f"{path}: expected a file, got a directory") from None
    except OSError as exc:
        raise ReaderError(f"{path}: cannot open: {exc.strerror or exc}") from None


def check_encoding(encoding: str) -> str:
    """Canonical codec name for `encoding`; ValueError (config style) if Python does not know it."""
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise ValueError(f"encoding: expected a Python codec name such as 'utf-8' or 'cp1252', "
                         f"got {encoding!r}") from None


def _bad_bytes(path: Path, lineno: int, data: bytes, exc: UnicodeDecodeError, encoding: str) -> ReaderError:
    hint = ("; if the file is in a legacy encoding set `encoding` (e.g. 'cp1252' or 'latin-1')"
            if codecs.lookup(encoding).name == "utf-8" else "")
    return ReaderError(f"{path}: line {lineno}: invalid {encoding} byte 0x{data[exc.start]:02x}; "
                       f"expected {encoding} text{hint}")


def decode_line(raw: bytes, path: Path, lineno: int, encoding: str = "utf-8") -> str:
    """Decode one line strictly; a bad byte is reported with file and line number."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise _bad_bytes(path, lineno, raw, exc, encoding) from None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark is not content
    return text


def iter_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its end-of-line) without loading the whole file."""
    try:
        with open_binary(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, decode_line(raw, path, lineno, encoding).rstrip("\r\n")
    except (OSError, EOFError) as exc:  # e.g. a truncated or corrupt .gz / .bz2
        raise ReaderError(f"{path}: cannot read: {exc}") from None


def decode_whole(data: bytes, path: Path, encoding: str = "utf-8") -> str:
    """Decode a whole (small) file strictly; an invalid byte is reported with its line number."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise _bad_bytes(path, data.count(b"\n", 0, exc.start) + 1, data, exc, encoding) from None
    return text[1:] if text.startswith("\ufeff") else text
