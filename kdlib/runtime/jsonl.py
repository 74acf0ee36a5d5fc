"""Reading JSON, written once: a JSON-lines file (one object per line, blank lines skipped, a bad line named by its
file and line number, or passed over for a metrics file whose last line a kill may have cut), and a whole JSON
file (a stage's state or report file), whose damage is named by file, line and column instead of a traceback.

Writers append whole lines (kdlib.runtime.metrics, the split and prediction files of finetune) or replace whole
files atomically; every reader of such a file, and of a user's JSON input, goes through `json_objects` or
`json_document`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

from kdlib.errors import ReaderError


def json_objects(path: str | os.PathLike, *, skip_bad: bool = False, encoding: str = "utf-8",
                 lines: Optional[Iterable[tuple[int, str]]] = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line. A line that is not a JSON object raises ReaderError
    "<path>: line <n>: ..." unless skip_bad. `lines`: (number, text) pairs already read from `path` (a reader that
    checks the encoding itself), else the file is read here."""
    path = Path(path)
    if lines is None:
        # "\n" only (read_text already turned \r\n and \r into it): splitlines would also cut at U+2028 and U+0085,
        # which JSON allows inside a string
        lines = enumerate(text_of(path, encoding).split("\n"), start=1)
    for number, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if skip_bad:
                continue
            raise ReaderError(f"{path}: line {number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            if skip_bad:
                continue
            raise ReaderError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


REWRITE_HINT = "move the file away to have it written again"  # for a stage's own state files


def json_document(path: str | os.PathLike, expect: type = dict, encoding: str = "utf-8", hint: str = REWRITE_HINT):
    """The JSON value of a whole file, of type `expect` (None: any). A file that is not UTF-8, is cut short or is
    not JSON raises ReaderError naming file, line and column (and `hint`, what to do about it); a missing file
    raises FileNotFoundError as before (callers that treat absence as "not done yet" test for it)."""
    path = Path(path)
    text = text_of(path, encoding)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = " (the file is cut short)" if text.rstrip()[-1:] not in ("}", "]") else ""
        raise ReaderError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno}){cut}"
                          + (f"; {hint}" if hint else "")) from None
    if expect is not None and not isinstance(value, expect):
        raise ReaderError(f"{path}: expected a JSON {_KINDS.get(expect, expect.__name__)}, got {type(value).__name__}")
    return value


_KINDS = {dict: "object", list: "array"}


def text_of(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; bytes that are not `encoding` raise ReaderError naming the line and byte."""
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        line = data.count(b"\n", 0, exc.start) + 1
        raise ReaderError(f"{path}: line {line}: not {encoding} text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})") from None
    except IsADirectoryError:
        raise ReaderError(f"{path}: a folder, expected a file") from None
