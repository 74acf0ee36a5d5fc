"""Atomic file writes: write to a temporary name in the same directory, fsync, then rename.

A reader never sees a half-written file, and a killed writer leaves only a `.tmp-*` file that
the next run ignores or removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdlib.errors import OutputError


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over `path`.

    Any writer (bytes, Parquet, ...) fills the temporary file; on error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it takes `path`'s place.

    A killed writer leaves only `.tmp-<name>` (cleared by the next attempt), never a half-written `path`.
    An existing `path` is replaced only when the caller says so (`replace`, after
    `kdlib.outputs.check_output_folder` found it to be its own); it is moved aside first and deleted only
    once the new folder is in place, so a failure in between never leaves neither.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise OutputError(f"{path}: already exists; nothing was changed (refusing to replace a folder the "
                          "caller did not claim)")
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    with atomic_target(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
