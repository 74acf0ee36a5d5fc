"""`python -m launch local --nproc N --config X.yaml [--stage S] [--step T] [--set k=v ...] [-- stage args]`: one machine,
N ranks.

The stage's steps run in the order launch.plans gives: a training step on all N ranks, any other step once.
`--stage data_pipeline` runs the pipeline once, on N local Dask workers (`--runner dask --local-workers N`) when
N > 1, as the stage does by itself (Beam's DirectRunner) when N is 1.

The same environment contract as torchrun or SLURM (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so a stage never knows which launcher started it. What this launcher adds
over torchrun is the exit status a user and a scheduler can act on:

* 2 when a flag or the config file is refused here, before any rank starts (launch/script_values.py: counts,
  the port, --set and stage arguments, the config read once as the stage will read it), or when the stage refused
  the config (every rank validates before any process group and prints one `error:` line; rank 0's is shown, the
  other ranks' copies are not repeated), no traceback of ours;
* 75 when the job was preempted (SIGTERM / SIGUSR1 / SIGINT to the launcher are forwarded to every
  rank; each checkpoints at the step boundary and exits 75): rerun the same command to resume;
* otherwise rank 0's status, or the first failing rank's. When a rank fails, the others are stopped
  (SIGTERM, then SIGKILL after a grace period) instead of waiting forever in a collective.

Rank 0 keeps the terminal (its progress bar and logs); ranks >= 1 are forwarded line by line with a
`[rank R]` prefix.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from kdlib.errors import KDError
from kdlib.runtime.cli import add_config_flags
from kdlib.runtime.process_group import free_port
from launch import dask_block, script_values as values
from launch.plans import STAGES, command, plan

USER_ERROR, REQUEUE = 2, 75
GRACE_S = 30.0  # how long ranks get to finish after one failed, before SIGKILL


def rank_env(rank: int, nproc: int, port: int, base: Optional[dict] = None) -> dict:
    """The variables every launcher sets for a rank (kdlib.runtime.process_group.dist_env reads them)."""
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N ranks x all cores would oversubscribe
    return env


class _Forward(threading.Thread):
    """Copy a rank's output to our stderr with a prefix; keep its `error:` lines to decide later."""

    def __init__(self, rank: int, stream):
        super().__init__(daemon=True)
        self.rank, self.stream, self.errors = rank, stream, []

    def run(self) -> None:
        for line in self.stream:
            if line.startswith("error: "):
                self.errors.append(line.rstrip("\n"))
                continue
            sys.stderr.write(f"[rank {self.rank}] {line}")
            sys.stderr.flush()


def exit_status(codes: list[int]) -> int:
    """One status for the job: 0 if every rank finished, 75 if ranks were preempted (and none failed), else
    rank 0's failing status, else the first failing rank's."""
    if all(c in (0, REQUEUE) for c in codes):
        return REQUEUE if REQUEUE in codes else 0  # a checkpoint was written: the rerun resumes
    if codes[0] not in (0, REQUEUE):
        return codes[0]
    return next(c for c in codes if c not in (0, REQUEUE))


def launch(stage: str, config: str, nproc: int, sets: list[str], port: Optional[int] = None,
           step: Optional[str] = None, stage_args: Optional[list[str]] = None) -> int:
    """Every step of the stage's plan in order (or only `step`); stops at the first that does not finish (0)."""
    port = port or free_port()
    for part in plan(stage, step):
        argv = command(sys.executable, stage, part, config, sets, stage_args or [])
        if part.dask:
            dask_block.check_stage_args(stage_args or [])
            argv += dask_block.local_args(nproc)
        code = run_ranks(argv, nproc if part.on_ranks else 1, port)
        if code != 0:
            return code
    return 0


def run_ranks(command: list[str], nproc: int, port: int) -> int:
    """`command` as ranks 0..nproc-1 (rank 0 keeps the terminal); one exit status for them all."""
    procs: list[subprocess.Popen] = []
    forwards: list[_Forward] = []
    for rank in range(nproc):
        piped = rank > 0
        proc = subprocess.Popen(command, env=rank_env(rank, nproc, port), text=True,
                                stdout=subprocess.PIPE if piped else None,
                                stderr=subprocess.STDOUT if piped else None)
        procs.append(proc)
        if piped:
            forwards.append(_Forward(rank, proc.stdout))
            forwards[-1].start()

    def forward_signal(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        codes = _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for f in forwards:
        f.join(timeout=5)
    status = exit_status(codes)
    if codes[0] != USER_ERROR:  # rank 0 printed its own error line; others' copies would only repeat it
        for f in forwards:
            for line in f.errors:
                sys.stderr.write(f"[rank {f.rank}] {line}\n")
    if status not in (0, USER_ERROR, REQUEUE):
        print(f"launch: ranks exited with {codes}", file=sys.stderr)
    return status


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every rank; once one fails, stop the others (SIGTERM, then SIGKILL after GRACE_S)."""
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if failed_at is None and any(c not in (None, 0, REQUEUE) for c in codes):  # 75: a rank checkpointed
            failed_at = time.monotonic()
            if not all(c == USER_ERROR for c in codes if c is not None):
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)


def parser() -> argparse.ArgumentParser:
    """The flags of `python -m launch local` (tests/launch/test_fuzz.py tries each)."""
    parser = argparse.ArgumentParser(prog="python -m launch local", description=__doc__.splitlines()[0])
    add_config_flags(parser)  # the stage's --config / --set, spelled and explained as every stage does
    parser.add_argument("--nproc", type=int, required=True,
                        help="ranks on this machine (one per GPU, or per core); data_pipeline: Dask workers")
    parser.add_argument("--stage", default="pretrain", choices=STAGES, help="the stage to run")
    parser.add_argument("--step", default=None, help="only this step of the stage (e.g. finetune's distill)")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument("stage_args", nargs="*", metavar="-- ARG",
                        help="after --: flags for the stage itself (e.g. -- --arm kd --fold 0)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:  # every value is checked (launch/script_values.py) before the first rank starts
        values.count("--nproc", args.nproc, 1)
        values.port("--master-port", args.master_port)
        plan(args.stage, args.step)  # an unknown --step fails before the config is read
        values.stage_command(args.config, args.set, args.stage_args)
        return launch(args.stage, args.config, args.nproc, args.set, args.master_port, args.step, args.stage_args)
    except KDError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
