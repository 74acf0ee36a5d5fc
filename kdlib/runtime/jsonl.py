"""Reading a JSON-lines file, written once: one object per line, blank lines skipped, and a bad line named by its
file and line number (or passed over, for a metrics file whose last line a kill may have cut).

Writers append whole lines (kdlib.runtime.metrics, the split and prediction files of finetune); every reader of
such a file, and of a user's JSONL input, goes through `json_objects`.
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
        lines = enumerate(path.read_text(encoding=encoding).split("\n"), start=1)
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
