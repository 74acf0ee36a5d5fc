"""A JSON-lines metrics file: one object per record, appended and flushed, readable while a job runs; and the same
numbers as TensorBoard scalars, in an events file beside it.

A resumed run appends to the same file, so a step may appear twice (before and after a kill);
`read_metrics` keeps the last record per (kind, step), which is what the resumed run computed.

TensorBoard: every numeric value of a record becomes a scalar at the record's step, tagged `<kind>/<key>`, except
a train record's loss terms, which sit under `train/loss/<term>` beside the total `train/loss` (so a train record
gives train/loss, train/loss/kd_topk, ..., train/lr, train/tokens, train/tokens_per_s, train/epoch, and an eval
record eval/top1_agreement, ...). The events file (`events.out.tfevents.<time>.<host>.<pid>.<n>`, TensorBoard's
own naming) lies in the folder of metrics.jsonl, so that `tensorboard --logdir <folder of runs>` names each run
by its run folder. It is written synchronously, one event per record, flushed like metrics.jsonl (no writer
thread: what metrics.jsonl holds after a kill, the events file holds too). NaN and infinities are written as they
are (TensorBoard marks them on the chart; dropping them would hide a diverging loss). Each writing session (a
start, each resume) opens a new events file, named to sort after the earlier ones, and begins it with a
SessionLog START at the step of its first record: TensorBoard then drops the killed session's values from that
step on (its Python reader purges at the START; its Rust data server drops a tag's points at and after any step
written again), so after a kill and a resume every step shows the resumed run's value once, as read_metrics.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import re
import socket
import struct
import sys
import time
from pathlib import Path

from kdlib.runtime.jsonl import json_objects

# The numeric fields of a train record that are not loss terms (kdlib/training/loop.py writes the total "loss", one
# value per objective, then these); every other number of a train record is a loss term: train/loss/<term>.
TRAIN_FIELDS = frozenset({"lr", "tokens", "tokens_per_s", "epoch", "layer_in_training"})
EVENTS_PREFIX = "events.out.tfevents."
_files = itertools.count()


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def scalar_tags(record: dict) -> dict[str, float]:
    """{TensorBoard tag: value} for every number of `record` (bools as 0/1), less its "kind" and "step"."""
    kind = str(record.get("kind", "metrics"))
    tags = {}
    for key, value in record.items():
        if key in ("kind", "step") or not isinstance(value, numbers.Real):
            continue
        if kind == "train" and key != "loss" and key not in TRAIN_FIELDS:
            tags[f"train/loss/{key}"] = float(value)
        else:
            tags[f"{kind}/{key}"] = float(value)
    return tags


class _Events:
    """One TensorBoard events file, written synchronously: TFRecord framing of tensorboard's own Event protos."""

    def __init__(self, folder: Path, first_step: int):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # lazily: only a writing rank pays the import
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        self._event, self._summary, self._crc = event_pb2.Event, summary_pb2.Summary, masked_crc32c
        # Readers take a run's files in name order: this session's must sort after every earlier one, even one
        # started within the same second (a quick requeue) or on another host.
        earlier = [int(m.group(1)) for p in folder.glob(EVENTS_PREFIX + "*")
                   if (m := re.match(re.escape(EVENTS_PREFIX) + r"(\d{10})\.", p.name))]
        stamp = max([int(time.time())] + [t + 1 for t in earlier])
        self.path = folder / f"{EVENTS_PREFIX}{stamp:010d}.{socket.gethostname()}.{os.getpid()}.{next(_files)}"
        self._handle = open(self.path, "ab")
        now = time.time()
        self._put(event_pb2.Event(wall_time=now, file_version="brain.Event:2", source_metadata=event_pb2.SourceMetadata(
            writer="kdlib.runtime.metrics")))
        # Drops, in TensorBoard's Python reader, what a killed session wrote at this step and after
        self._put(event_pb2.Event(wall_time=now, step=first_step,
                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._handle.flush()

    def _put(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._handle.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))

    def write(self, step: int, tags: dict[str, float]) -> None:
        values = [self._summary.Value(tag=tag, simple_value=value) for tag, value in tags.items()]
        self._put(self._event(wall_time=time.time(), step=step, summary=self._summary(value=values)))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class MetricsWriter:
    """Append records to `path` (one JSON object per line), flushed after each write; with `tensorboard`, each
    record's numbers also go to a TensorBoard events file in the same folder (see the module's docstring).
    `enabled`: whether this process writes at all (rank 0 of a job)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self._handle = None
        self._events = None  # opened at the first record: its step starts the session (SessionLog START)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")

    @property
    def events_path(self) -> Path | None:
        """This session's TensorBoard events file (None before the first record, after close() or without TensorBoard)."""
        return self._events.path if self._events is not None else None

    def write(self, record: dict) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._handle.flush()
        if self.tensorboard and isinstance(record.get("step"), numbers.Integral):
            step = int(record["step"])
            if self._events is None:
                try:
                    self._events = _Events(self.path.parent, step)
                except ImportError as err:
                    self.tensorboard = False
                    print(f"warning: no TensorBoard events beside {self.path} ({err}); metrics.jsonl has every "
                          "record (pip install -r requirements.txt installs tensorboard)", file=sys.stderr, flush=True)
                    return
            tags = scalar_tags(record)
            if tags:
                self._events.write(step, tags)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._events is not None:
            self._events.close()
            self._events = None


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
