"""Output folders: whether a stage may write into one, and who is writing it now.

Every stage writes one folder (a teacher folder, a transfer set, a run folder). Two promises hold
for all of them:

* Nothing is lost. `check_output_folder` lets a stage write into a folder only if it is absent or
  empty, or is this stage's own artefact; one built from other inputs is replaced only with an
  explicit `overwrite: true`; a folder this stage did not write (another stage's artefact, a
  person's files) is refused even then, with what it holds and how to proceed.
* One writer at a time. `output_lock` holds `.lock-<name>` beside the folder (host, pid, process start
  time, stage, command) while a stage writes. A second writer is refused, naming the holder. A lock left by a
  process that no longer exists on this host (a SIGKILL) is stale and is taken over; one from
  another host cannot be checked from here and is refused, with the file to delete if that job is gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from kdlib.config import config_hash, to_dict
from kdlib.errors import OutputError
from kdlib.runtime.io import atomic_write_text

LOCK = ".lock"


def _contents(folder: Path) -> list[Path]:
    """What a folder holds, less lock files (a stale lock alone does not make a folder anyone's)."""
    return [p for p in folder.iterdir() if not p.name.startswith(LOCK)]


def listing(folder: Path, most: int = 4) -> str:
    """'a.json, b/ and 3 more': what a folder holds, for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in _contents(folder))
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def read_stamp(folder: str | os.PathLike, name: str, stage: Optional[str] = None) -> Optional[dict]:
    """The JSON object a stage leaves in `folder/name` (its report, manifest) to know the folder as its own.

    None when that file is absent or, with `stage`, not an object whose "stage" is `stage` (another stage's,
    or a person's file); ValueError when it is there but unreadable or, without `stage`, not a JSON object:
    each stage decides whether an unreadable stamp of its own is replaceable, refused or an error."""
    path = Path(folder) / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror}") from None
    if stage is not None:
        return data if isinstance(data, dict) and data.get("stage") == stage else None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_output_folder(path: str | os.PathLike, *, stage: str, found_claim: Optional[str], claim: str,
                        overwrite: bool, where: str = "output_dir", difference: str = "") -> str:
    """What writing `path` would do: "new" (absent or empty), "same" (this stage's artefact from the same
    inputs: the stage resumes or skips it) or "replace" (its artefact from other inputs, with overwrite).

    `found_claim` is the claim the stage read from its own files in `path` (a config hash, fingerprints),
    None when the folder holds no artefact of this stage; `difference` says in words how the claims
    differ (default: both claims). Anything else raises OutputError.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{where}: {path} is a file, not a folder; choose a folder path for {stage}")
    if not path.exists() or not _contents(path):
        return "new"
    if found_claim is None:
        raise OutputError(f"{where}: {path} already holds files that {stage} did not write ({listing(path)}); "
                          f"nothing was changed. Choose another {where}, or move that folder away first")
    if found_claim == claim:
        return "same"
    if not overwrite:
        difference = difference or f"folder: {found_claim}, this run: {claim}"
        raise OutputError(f"{where}: {path} was written by {stage} from other inputs ({difference}); nothing was "
                          f"changed. Choose another {where}, or set overwrite: true to replace it")
    return "replace"


# ---------------------------------------------------------------- the writer's lock


def process_start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start_time(os.getpid())}


def _is_stale(holder: dict) -> bool:
    """True only when the holder certainly is gone: same host, and its pid is dead or now another process."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    return holder.get("start") is not None and process_start_time(pid) not in (None, holder.get("start"))


def _read_holder(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # being written this very moment (O_EXCL create, then write) or damaged: young means held
        try:
            young = time.time() - path.stat().st_mtime < 10
        except FileNotFoundError:
            return None
        return {"host": "?", "pid": "?", "stage": "?", "since": "?"} if young else {"host": socket.gethostname()}


def lock_path(folder: str | os.PathLike, rank: int = 0) -> Path:
    """The lock of `folder`: `.lock-<name>` beside it, so that every stage writing that folder takes the same
    file and the lock outlives a swap of the folder; training rank R > 0 holds `.lock-<name>.rank-R` too."""
    folder = Path(folder)
    return folder.with_name(f"{LOCK}-{folder.name}" + (f".rank-{rank}" if rank else ""))


def lock_holder(folder: str | os.PathLike, rank: int = 0) -> Optional[dict]:
    """Who holds `folder`'s lock now (host, pid, stage, since), or None when nobody does (no lock, or a stale one):
    for tools that report on a folder without writing it, so they take no lock themselves."""
    holder = _read_holder(lock_path(folder, rank))
    return None if holder is None or _is_stale(holder) else holder


@contextmanager
def output_lock(folder: str | os.PathLike, stage: str, rank: int = 0) -> Iterator[Path]:
    """Hold `lock_path(folder, rank)` while the block writes `folder`; refuse when another live process holds
    it. Training ranks each hold their own, so no rank of a second job starts writing beside a first job's."""
    folder = Path(folder)
    path = lock_path(folder, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, no permission, a read-only disk
        raise OutputError(f"{path.parent}: cannot create the output folder ({err.strerror})") from None
    mine = dict(_me(), stage=stage, since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                command=" ".join(sys.argv)[:500])
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError as err:
            raise OutputError(f"{folder}: cannot write there ({err.strerror})") from None
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our open and our read
            if not _is_stale(holder):
                raise OutputError(
                    f"{folder}: in use by {holder.get('stage', '?')} (pid {holder.get('pid')} on host "
                    f"{holder.get('host')}, since {holder.get('since')}); nothing was changed. Wait for it to "
                    f"finish or stop it; if that process no longer exists, delete {path}") from None
            print(f"{folder}: taking over a stale lock of pid {holder.get('pid')} (no longer running)", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(mine))
            handle.flush()
            os.fsync(handle.fileno())
        break
    else:
        raise OutputError(f"{folder}: could not take {path} (another process keeps taking it)")
    try:
        yield path
    finally:
        holder = _read_holder(path)
        if holder is not None and (holder.get("pid"), holder.get("start")) == (mine["pid"], mine["start"]):
            path.unlink(missing_ok=True)


def save_resolved(config: Any, directory: str | os.PathLike, name: str = "resolved_config") -> Path:
    """Write the resolved config (YAML, plus its hash) next to an artifact, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(to_dict(config), sort_keys=False)
    text = f"# config_hash: {config_hash(config)}\n{body}"
    target = directory / f"{name}.yaml"
    atomic_write_text(target, text)
    return target
