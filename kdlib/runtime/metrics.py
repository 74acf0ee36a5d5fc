"""A JSON-lines metrics file: one object per record, appended and flushed, readable while a job runs.

A resumed run appends to the same file, so a step may appear twice (before and after a kill);
`read_metrics` keeps the last record per (kind, step), which is what the resumed run computed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from kdlib.runtime.jsonl import json_objects


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Append records to `path` (one JSON object per line), flushed after each write."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._handle = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: str | os.PathLike, kind: str = "train") -> list[dict]:
    """Records of one kind, the last one per step, in step order (a torn last line is ignored)."""
    by_step: dict[int, dict] = {}
    path = Path(path)
    if not path.is_file():
        return []
    for _, record in json_objects(path, skip_bad=True):  # skip_bad: a line cut by a kill
        if record.get("kind") == kind:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]
