"""The process group: which rank this process is (from the launcher's variables or SLURM's), and the
collective calls the stages make. Model code never imports this module (nor torch.distributed directly).
torch.distributed is imported inside the functions: launchers import `free_port` without loading torch.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str = "127.0.0.1"
    master_port: str = "29500"


def dist_env() -> DistEnv:
    """Rank / world size from torchrun or the deepspeed launcher (RANK...), else SLURM, else one process.

    Reads the environment only; `init_distributed` exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT (what torch.distributed's env:// reads) when only SLURM's are present, as under
    plain `srun`.
    """
    env = os.environ
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        addr = addr or _slurm_head_node()
        port = port or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    else:
        rank, world, local = 0, 1, 0
        port = port or str(free_port())
    return DistEnv(rank, world, local, addr or "127.0.0.1", port or "29500")


def _slurm_head_node() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return re.split(r"[,\[]", nodes)[0]


def free_port() -> int:
    """A TCP port free on this machine now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_saved_environment: dict[str, Optional[str]] = {}  # what init_distributed replaced, put back by shutdown


def init_distributed(backend: str = "auto") -> DistEnv:
    """Start the process group (env:// rendezvous) once per process; returns this process's place.

    The rendezvous variables it exports (what env:// reads) are put back by `shutdown`, so a later job in
    the same process, or a process it starts (a launcher, a pipeline), does not inherit this job's rank."""
    # torch and deepspeed (~3 s to import) load here, not at the top: launchers import free_port without them
    import deepspeed
    import torch
    import torch.distributed as dist  # not at the top: launchers import free_port without torch

    place = dist_env()
    if not _saved_environment:
        _saved_environment.update({k: os.environ.get(k) for k in RENDEZVOUS_VARS})
    os.environ.update(RANK=str(place.rank), WORLD_SIZE=str(place.world_size), LOCAL_RANK=str(place.local_rank),
                      MASTER_ADDR=place.master_addr, MASTER_PORT=place.master_port)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(place.local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        if place.world_size > 1:
            _learn_peers(place)
    return place


_peers: dict[str, tuple[int, str]] = {}  # address -> (rank, host name) of every rank, for naming a lost one


def _learn_peers(place: DistEnv) -> None:
    """Every rank's host name and the address its peers reach it at (one all_gather at start): when a
    connection breaks, the error then names a node, not only an address."""
    import torch.distributed as dist  # not at the top: launchers import free_port without torch

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the interface that leads to the master
        try:
            probe.connect((place.master_addr, int(place.master_port)))
            address = probe.getsockname()[0]
        except OSError:
            address = ""
    found: list = [None] * place.world_size
    dist.all_gather_object(found, (place.rank, socket.gethostname(), address))
    _peers.clear()
    _peers.update({addr: (rank, host) for rank, host, addr in found if addr})


def lost_peer(error: BaseException) -> Optional[str]:
    """'rank R on host H (address)' when `error` is a collective that lost its connection to a peer, else None."""
    text = str(error)
    if not re.search(r"Connection (reset|closed)|Broken pipe|Socket closed|timed out", text, re.IGNORECASE):
        return None
    match = re.search(r"\[([0-9A-Fa-f.:]+)\]:\d+", text)
    if match is None:
        return None
    address = match.group(1)
    if address in _peers:
        rank, host = _peers[address]
        return f"rank {rank} on host {host} ({address})"
    return f"the rank at {address}"


def barrier() -> None:
    import torch.distributed as dist  # not at the top: launchers import free_port without torch

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """End a job's use of the process group: put back the rendezvous variables, and in a one-process job close the
    group and forget the groups DeepSpeed cached on it (module globals in deepspeed.utils.groups), so a later job
    in the same process (a stage with sub-steps, a test) can start again; without this, its engine broadcasts
    over a destroyed group.

    With several ranks the group stays open until the process ends, and the next job of the process (finetune's
    next run) reuses it: a second rendezvous on the same port can reach rank 0's first store before rank 0 has
    closed it, and then never completes (seen: both ranks waiting for ever after a run)."""
    # here, not at the top: launchers import free_port without torch or deepspeed (module docstring)
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized() and dist.get_world_size() > 1:
        _restore_environment()
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    _restore_environment()
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name, {}).clear()


def _restore_environment() -> None:
    for key, value in _saved_environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_environment.clear()


def all_reduce_sum(tensor) -> None:
    """In-place sum over ranks (a no-op in a single process without a process group)."""
    import torch.distributed as dist  # not at the top: launchers import free_port without torch

    if dist.is_initialized():
        dist.all_reduce(tensor)
