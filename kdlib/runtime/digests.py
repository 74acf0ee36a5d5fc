"""Digests of a folder's files, written when the folder is complete and checked before anything opens it.

DeepSpeed's own loaders use `torch.load(weights_only=False)`: unpickling, which can run code. Our runs
load through kdlib/training/safe_load.py instead (weights_only=True with four DeepSpeed classes allowed), and
this check comes first, as a second wall: at save time every file in the step folder is hashed into
`digests.json`; before anything opens one of them the folder is checked against it, and a file that changed,
is missing, or was never written by the run (a planted pickle) is refused by name.

What this protects against: files replaced, corrupted or added after the run wrote them (a copy
from elsewhere, a truncated transfer, a file dropped in). What it does not: someone who can write
the folder can also rewrite `digests.json`; keep checkpoint folders as private as the code you run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdlib.errors import KDError
from kdlib.runtime.io import atomic_write_text, sha256_file

DIGESTS = "digests.json"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != DIGESTS)


def write_digests(folder: str | os.PathLike) -> Path:
    """sha256 of every file below `folder` into `folder/digests.json` (call once the folder is complete)."""
    folder = Path(folder)
    files = {name: sha256_file(folder / name) for name in _files(folder)}
    target = folder / DIGESTS
    atomic_write_text(target, json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    return target


def verify_digests(folder: str | os.PathLike) -> None:
    """Refuse `folder` unless its files are exactly those recorded in digests.json, byte for byte."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / DIGESTS).read_text())["files"]
    except FileNotFoundError:
        raise KDError(f"{folder}: no {DIGESTS}, so its files cannot be checked before they are unpickled; refusing "
                      "to load it (a checkpoint from another tool or an older version: resume: false starts afresh)"
                      ) from None
    except (ValueError, KeyError, TypeError):
        raise KDError(f"{folder / DIGESTS}: not a readable digest file; refusing to load the checkpoint") from None
    present = _files(folder)
    foreign = sorted(set(present) - set(recorded))
    if foreign:
        raise KDError(f"{folder}: {', '.join(foreign)} was not written with this checkpoint (not in {DIGESTS}); "
                      "refusing to load it. Remove the file if you know where it came from")
    missing = sorted(set(recorded) - set(present))
    if missing:
        raise KDError(f"{folder}: {', '.join(missing)} recorded in {DIGESTS} is missing; refusing to load it")
    for name in present:
        actual = sha256_file(folder / name)
        if actual != recorded[name]:
            raise KDError(f"{folder / name}: changed since the checkpoint was written (sha256 {actual}, recorded "
                          f"{recorded[name]}); refusing to load it")
