"""Checkpoints of a DeepSpeed engine that a kill at any moment cannot corrupt, loading them at another world
size, and ZeRO-3 consolidation.

DeepSpeed writes into `<dir>/.tmp-step-N/`, which is renamed to `step-N` once every rank has finished, and only
then does the `latest` text file (written atomically) point at it: a job killed at any moment leaves either the
previous complete checkpoint or the new one, never a half-written one that `latest` names.

At another data-parallel size (DeepSpeed 0.19.8, measured on CPU/gloo): ZeRO-0 keeps the whole optimizer state
in `mp_rank_00_model_states.pt`, which every rank loads as is. ZeRO-1/2 partition it per rank, and a plain
`engine.load_checkpoint` refuses ("The checkpoint being loaded used a DP world size of 2 but the current world
size is 1. Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not currently
supported."; `zero_optimization.elastic_checkpoint` does not get past that check); DeepSpeed's universal
checkpoint (deepspeed/checkpoint/ds_to_universal.py, loaded with `checkpoint.load_universal`) re-partitions it,
so rank 0 converts the step folder into `universal-step-N` beside it, every rank loads that, and it is deleted.
ZeRO-3's universal load applies the first parameter group's hyperparameters to every group (weight decay on
biases, one learning rate for all layer-decay groups), and even with them put back its updates depart from
the uninterrupted run's: ZeRO-3 resumes only at the world size it was saved at.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from kdlib.runtime.digests import verify_digests, write_digests
from kdlib.errors import KDError
from kdlib.runtime.io import atomic_write_text, replace_directory
from kdlib.runtime.process_group import all_reduce_sum, barrier
from kdlib.training.safe_load import weights_only_loads

LATEST = "latest"
TMP_PREFIX = ".tmp-"
UNIVERSAL_PREFIX = "universal-"  # `universal-step-N`: DeepSpeed's universal copy of step-N, only while it loads


def _rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def step_tag(step: int) -> str:
    return f"step-{step}"


def save_checkpoint(engine, directory: str | os.PathLike, step: int, side_files: dict[str, str],
                    rank_files: dict[str, str] | None = None, keep: int = 0) -> Path:
    """Collective: every rank calls it. Writes `.tmp-step-N`, renames it to `step-N`, then `latest`.

    `side_files` (name -> text) are written by rank 0, `rank_files` by each rank (e.g. its RNG
    states), both into the step folder before the rename, so a complete folder holds everything.
    """
    directory = Path(directory)
    rank = _rank()
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


def needs_universal(folder: str | os.PathLike, zero_stage: int, saved_world: int, world: int) -> bool:
    """Whether loading `folder`, saved by `saved_world` ranks, on `world` ranks goes through DeepSpeed's universal
    checkpoint (ZeRO-1/2 at another size; the engine must then be built with `checkpoint.load_universal`).
    KDError for ZeRO-3 at another size (see the module docstring)."""
    if saved_world == world or zero_stage == 0:
        return False
    if zero_stage == 3:
        raise KDError(f"{folder}: saved at world size {saved_world}, now {world}: a ZeRO-3 checkpoint resumes only at "
                      f"the world size it was saved at (DeepSpeed 0.19.8's universal checkpoint restores ZeRO-3 "
                      f"optimizer state wrongly for several parameter groups); run {saved_world} ranks, or train "
                      f"with engine.zero_stage 0-2 to change the node count")
    return True


def universal_copy(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Path:
    """Collective: DeepSpeed's universal checkpoint of ZeRO-1/2 step folder `folder`, which loads at any
    data-parallel size. Rank 0 converts into `<dir>/.tmp-universal-step-N/step-N` (the step folder is only read)
    and renames that to `<dir>/universal-step-N`; the others wait. Returns the copy's root (the tag is still
    step-N). Call it only on a folder whose digests were just verified: the conversion reads its files (with
    torch.load(weights_only=True): kdlib/training/safe_load.py).
    `device`: where the process group's backend reduces (the engine's device; nccl needs CUDA tensors)."""
    folder = Path(folder)
    final = folder.parent / f"{UNIVERSAL_PREFIX}{folder.name}"
    tmp = folder.parent / f"{TMP_PREFIX}{UNIVERSAL_PREFIX}{folder.name}"
    failed = torch.zeros(1, device=device)
    error: Optional[BaseException] = None
    if _rank() == 0:
        try:
            for stale in (tmp, final):  # left by a job killed while converting or loading: never trusted
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            _convert_to_universal(folder, tmp / folder.name)
            os.rename(tmp, final)
        except Exception as err:  # the other ranks learn of it below instead of waiting at a barrier forever
            shutil.rmtree(tmp, ignore_errors=True)
            failed += 1
            error = err
    all_reduce_sum(failed)
    if isinstance(error, KDError):  # e.g. a file that needs a global outside kdlib/training/safe_load.py's list
        raise error
    if error is not None:
        raise KDError(f"{folder}: converting it to a universal checkpoint (to load it at another world size) failed: "
                      f"{type(error).__name__}: {error}") from error
    if failed.item():
        raise KDError(f"{folder}: rank 0 could not convert it to a universal checkpoint (see rank 0's error)")
    return final


def _convert_to_universal(folder: Path, output: Path) -> None:
    """deepspeed/checkpoint/ds_to_universal.py on one folder, in this process (one worker: no process pool), its
    progress output kept back. `inject_missing_state`: our engines record no universal_checkpoint_info (only
    tensor-parallel models need one); the conversion adds the version marker in memory, not to the folder."""
    # deepspeed: ~0.6 s to import on top of torch; only a resume at another world size converts
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(folder), output_folder=str(output), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), weights_only_loads():
        ds_to_universal(args)


def load_checkpoint(engine, folder: str | os.PathLike, *, verified: bool = False, universal: bool = False) -> None:
    """Collective: restore module, optimizer, scheduler (and ZeRO partitions) from a step folder, whose files
    are first checked against its digests (unless the caller just did). `universal`: through a universal copy
    (`needs_universal`), deleted once every rank has loaded it; the engine was built with load_universal."""
    folder = Path(folder)
    if not verified:
        verify_digests(folder)
    root = universal_copy(folder, engine.device) if universal else folder.parent
    # the engine's own loads are weights_only (kdlib/training/safe_load.py); a universal load also calls torch.load
    with weights_only_loads() if universal else contextlib.nullcontext():
        path, _ = engine.load_checkpoint(str(root), tag=folder.name, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
    if universal:  # (after a failed load the copy stays; the next resume replaces it, never trusting it)
        barrier()  # every rank has read the copy
        if _rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    if path is None:
        raise KDError(f"{folder}: DeepSpeed found no checkpoint to load there")


def consolidated_fp32_state_dict(folder: str | os.PathLike) -> dict:
    """Full fp32 weights from a ZeRO 1-3 checkpoint folder, via DeepSpeed's own zero_to_fp32 (one process), its
    files checked against the digests and read with torch.load(weights_only=True)."""
    # deepspeed: ~0.6 s to import on top of torch; only consolidating a ZeRO checkpoint needs it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    verify_digests(folder)
    with weights_only_loads():  # zero_to_fp32 calls torch.load(weights_only=False) itself
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
