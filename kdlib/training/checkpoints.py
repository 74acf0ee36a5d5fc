"""Checkpoints of a DeepSpeed engine that a kill at any moment cannot corrupt, and ZeRO-3 consolidation.

DeepSpeed writes into `<dir>/.tmp-step-N/`, which is renamed to `step-N` once every rank has finished, and only
then does the `latest` text file (written atomically) point at it: a job killed at any moment leaves either the
previous complete checkpoint or the new one, never a half-written one that `latest` names.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from kdlib.runtime.digests import verify_digests, write_digests
from kdlib.errors import KDError
from kdlib.runtime.io import atomic_write_text, replace_directory
from kdlib.runtime.process_group import barrier

LATEST = "latest"
TMP_PREFIX = ".tmp-"


def step_tag(step: int) -> str:
    return f"step-{step}"


def save_checkpoint(engine, directory: str | os.PathLike, step: int, side_files: dict[str, str],
                    rank_files: dict[str, str] | None = None, keep: int = 0) -> Path:
    """Collective: every rank calls it. Writes `.tmp-step-N`, renames it to `step-N`, then `latest`.

    `side_files` (name -> text) are written by rank 0, `rank_files` by each rank (e.g. its RNG
    states), both into the step folder before the rename, so a complete folder holds everything.
    """
    directory = Path(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag, tmp_tag = step_tag(step), f"{TMP_PREFIX}{step_tag(step)}"
    final, tmp = directory / tag, directory / tmp_tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a job killed mid-save
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(directory), tag=tmp_tag, save_latest=False)
    for name, text in (rank_files or {}).items():
        atomic_write_text(tmp / name, text)
    if rank == 0:
        for name, text in side_files.items():
            atomic_write_text(tmp / name, text)
    barrier()  # every rank's shards are on disk before the folder is declared complete
    if rank == 0:
        write_digests(tmp)  # checked before anything unpickles these files (kdlib/runtime/digests.py)
        replace_directory(tmp, final)  # a resumed run re-saving the same step swaps it: `latest` never dangles
        atomic_write_text(directory / LATEST, tag + "\n")
        if keep > 0:
            prune_checkpoints(directory, keep)
    barrier()
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The folder `latest` names, or None when no checkpoint was completed."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not re.fullmatch(r"step-\d+", name):  # never a path that leads out of the checkpoints folder
        raise KDError(f"{pointer}: names {name!r}, not a step folder of this run (step-N); refusing to follow it")
    folder = Path(directory) / name
    if not folder.is_dir():
        raise KDError(f"{pointer}: names {folder.name}, which does not exist (the checkpoint folder was removed?)")
    return folder


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in directory.iterdir() if re.fullmatch(r"step-\d+", p.name))


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one `latest` names)."""
    latest = latest_checkpoint(directory)
    for step in checkpoint_steps(directory)[:-keep]:
        folder = Path(directory) / step_tag(step)
        if latest is None or folder.resolve() != latest.resolve():
            shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(engine, folder: str | os.PathLike, *, verified: bool = False) -> None:
    """Collective: restore module, optimizer, scheduler (and ZeRO partitions) from a step folder, whose files
    are first checked against its digests (unless the caller just did)."""
    folder = Path(folder)
    if not verified:
        verify_digests(folder)
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise KDError(f"{folder}: DeepSpeed found no checkpoint to load there")


def consolidated_fp32_state_dict(folder: str | os.PathLike) -> dict:
    """Full fp32 weights from a ZeRO 1-3 checkpoint folder, via DeepSpeed's own zero_to_fp32 (one process)."""
    # deepspeed: ~0.6 s to import on top of torch; only consolidating a ZeRO checkpoint needs it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    verify_digests(folder)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
