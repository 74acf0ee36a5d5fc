"""Atomic file writes: write to a temporary name in the same directory, fsync, then rename.

A reader never sees a half-written file, and a killed writer leaves only a `.tmp-*` file that
the next run ignores or removes.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import sys
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


def staging_path(path: str | os.PathLike) -> Path:
    """Where a folder is built before it takes `path`'s place: `.tmp-<name>` beside it (ignored by readers)."""
    path = Path(path)
    return path.with_name(f".tmp-{path.name}")


@contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it takes `path`'s place.

    A killed writer leaves only `.tmp-<name>` (cleared by the next attempt), never a half-written `path`.
    An existing `path` is replaced only when the caller says so (`replace`, after
    `kdlib.runtime.outputs.check_output_folder` found it to be its own), by `replace_directory`.
    """
    path = Path(path)
    if path.exists() and not replace and (not path.is_dir() or any(path.iterdir())):
        raise OutputError(f"{path}: already exists; nothing was changed (refusing to replace a folder the "
                          "caller did not claim)")
    tmp = staging_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # e.g. a filesystem without exchange support: fall back to two renames


def replace_directory(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put folder `new` in the place of `path` (which may exist). Readers of `path` see the old folder or the
    new one: an atomic exchange where the OS has one, else two renames a moment apart; the old folder is
    deleted only once the new one is in place."""
    new, path = Path(new), Path(path)
    if path.exists() and _exchange(new, path):
        shutil.rmtree(new)  # now holds the old folder
        return
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    new.rename(path)
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


def json_safe(value):
    """A JSON-safe copy of nested dicts / lists: nan and inf become null (JSON has no nan), so reports can
    be written with allow_nan=False and read back by any JSON reader."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
