"""`python -m launch slurm --config X.yaml --nodes N --gpus-per-node G [--stage S] [--step T] [--time ...] [--dry-run]
[-- stage flags]`.

Renders one sbatch script from `launch/templates/sbatch.sh`: N nodes, one task per GPU (or
`--tasks-per-node` on CPU nodes), the rendezvous derived from SLURM itself, a warning signal before
the time limit and a requeue on preemption, the stage's plan (launch/plans.py: training steps with srun on
every task, the others once), logs in `<output_dir>/slurm/job-<id>.out`. `--stage data_pipeline` instead runs
a Dask scheduler on the first node, one worker per node and the pipeline once (launch/dask_block.py; logs in
`<output_dir>.slurm/`, since the pipeline refuses an output_dir holding files it did not write). Before anything
is submitted the stage validates the config for the job's world size (`python -m <stage> --check`, for every
stage that has it), so a config error fails here, in one line, not in the queue, and every value that goes into
the script is checked and quoted by launch/script_values.py (a --partition also against the partitions `sinfo`
lists, where sinfo runs). `--dry-run` prints the script and writes nothing; otherwise it is saved beside the logs
and handed to sbatch."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from textwrap import indent
from typing import Optional

from kdlib.runtime.cli import add_config_flags
from kdlib.errors import KDError
from launch import dask_block, script_values as values
from launch.local import USER_ERROR
from launch.plans import STAGES, command, plan

TEMPLATE = Path(__file__).with_name("templates") / "sbatch.sh"


@dataclass
class SlurmJob:
    """Everything the sbatch script says, in one place."""

    config: str  # the stage config (an absolute path in the script)
    nodes: int
    gpus_per_node: int  # 0 on CPU nodes
    tasks_per_node: int  # ranks per node (= gpus_per_node on GPU nodes)
    output_dir: str  # the stage's output_dir: logs go to <output_dir>/slurm/ (data_pipeline: <output_dir>.slurm/)
    stage: str = "pretrain"
    cpus_per_task: int = 4
    time: Optional[str] = None  # the time limit (the warning signal needs one)
    partition: Optional[str] = None
    warn_seconds: int = 120  # SIGUSR1 this long before the time limit
    job_name: str = ""
    sets: list[str] = field(default_factory=list)  # --set overrides passed to the stage
    step: Optional[str] = None  # only this step of the stage's plan (launch/plans.py)
    stage_args: list[str] = field(default_factory=list)  # the stage's own flags (after `--`)
    exports: dict[str, str] = field(default_factory=dict)  # extra environment for every task
    python: str = sys.executable
    workdir: str = field(default_factory=lambda: str(Path.cwd()))  # where the job runs (this checkout)

    @property
    def dask(self) -> bool:
        """The stage runs on a Dask cluster the script starts (data_pipeline), not as ranks."""
        return any(step.dask for step in plan(self.stage, self.step))

    @property
    def log_dir(self) -> Path:
        return dask_block.log_dir(self.output_dir) if self.dask else Path(self.output_dir) / "slurm"

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def render(job: SlurmJob, script: Optional[Path] = None) -> str:
    """The sbatch script, as text a user can read and edit."""
    q = values.quote
    return Template(TEMPLATE.read_text()).substitute(
        rendered=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), script=script or "<this file>",
        job_name=job.job_name or f"kd-{job.stage}", nodes=job.nodes, tasks_per_node=job.tasks_per_node,
        cpus_per_task=job.cpus_per_task,
        gpus_line=f"#SBATCH --gpus-per-node={job.gpus_per_node}" if job.gpus_per_node else "# (CPU nodes: no GPUs)",
        time_line=f"#SBATCH --time={job.time}" if job.time else "# (no --time: the partition's limit applies)",
        partition_line=f"#SBATCH --partition={job.partition}" if job.partition else "# (default partition)",
        signal_line="# (no warning signal: each finished shard is kept, and a restart resumes from them)" if job.dask
        else f"#SBATCH --signal=USR1@{job.warn_seconds}", warn_seconds=job.warn_seconds, log_dir=job.log_dir,
        log_pattern=values.sbatch_output("output_dir", job.log_dir), log_dir_q=q(str(job.log_dir)), workdir=q(job.workdir),
        exports="\n".join(f"export {k}={q(v)}" for k, v in job.exports.items()) or "# (no extra environment)",
        out_dir=q(job.output_dir), steps=steps_block(job))


def steps_block(job: SlurmJob) -> str:
    """The shell lines that run the stage's plan: srun for a step on every task, a plain command for a step run
    once (as a one-process job: the batch shell's SLURM_NTASKS would otherwise make it believe it is one rank of
    many), a Dask cluster around a dask step; each later step only if the earlier ones finished."""
    config = str(Path(job.config).resolve())
    lines = []
    for i, step in enumerate(plan(job.stage, job.step)):
        words = command(job.python, job.stage, step, config, job.sets, job.stage_args)
        argv = values.shell_line(words)
        if step.dask:
            run = dask_block.block(words, job.python, job.workdir, job.nodes, step.log_name(job.stage))
        elif step.on_ranks:
            run = f'srun --output="$ranks/{step.log_name(job.stage)}" {argv}'
        else:
            run = f'RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 {argv} >"$ranks/{step.log_name(job.stage)}" 2>&1'
        run = run if step.dask else f"{run}\ncode=$?"  # the Dask block sets code itself
        lines.append(run if i == 0 else 'if [ "$code" -eq 0 ]; then\n' + indent(run, "  ") + "\nfi")
    return "\n".join(lines)


def check_config(job: SlurmJob) -> None:
    """The stage validates the config as rank 0 of the job's world size; its one error line is ours."""
    env = dict(os.environ, RANK="0", WORLD_SIZE=str(job.world_size), LOCAL_RANK="0")
    argv = command(job.python, job.stage, plan(job.stage, job.step)[0], job.config, job.sets, job.stage_args)
    proc = subprocess.run(argv + ["--check"], env=env, capture_output=True, text=True, cwd=job.workdir)
    if proc.returncode != 0:
        lines = [line[len("error: "):] for line in proc.stderr.splitlines() if line.startswith("error: ")]
        raise KDError(lines[-1] if lines else f"{job.config}: the stage's check failed (exit {proc.returncode}):\n"
                      f"{proc.stderr[-2000:]}")


def submit(job: SlurmJob) -> str:
    """Save the script beside the logs, sbatch it; returns the job id."""
    job.log_dir.mkdir(parents=True, exist_ok=True)
    script = job.log_dir / f"{job.job_name or 'kd-' + job.stage}-{time.strftime('%Y%m%dT%H%M%S')}.sbatch"
    script.write_text(render(job, script))
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise KDError(f"sbatch is not on PATH: this is not a SLURM login node (the script is in {script})") from None
    if proc.returncode != 0:
        raise KDError(f"sbatch refused {script}: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {script}\nlogs: {job.log_dir}/job-{job_id}.out")
    return job_id


def check_partition(partition: Optional[str]) -> None:
    """A --partition this cluster's `sinfo` does not list is refused here (a dry run would print it without a word,
    and sbatch refuse it only later). Each name of a comma list is checked; sinfo's `*` marks the default partition.
    Where sinfo is missing or fails, the name cannot be checked: one line says so and the launch goes on."""
    if partition is None:
        return
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        print(f"[launch] --partition {partition!r} not checked: sinfo is not on this machine", file=sys.stderr)
        return
    try:  # --all: hidden partitions too, which a user may be allowed to submit to
        proc = subprocess.run([sinfo, "--all", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        failure = None if proc.returncode == 0 else f"exit {proc.returncode}" + (f": {last}" if last else "")
    except (OSError, subprocess.TimeoutExpired) as err:
        failure = f"{type(err).__name__}: {err}"
    if failure is not None:
        print(f"[launch] --partition {partition!r} not checked: sinfo failed ({failure})", file=sys.stderr)
        return
    known = list(dict.fromkeys(line.strip().rstrip("*") for line in proc.stdout.splitlines() if line.strip()))
    for name in partition.split(","):
        if name not in known:
            raise KDError(f"--partition: {name!r} is not a partition of this cluster (sinfo lists: "
                          f"{', '.join(known) or 'none'})")


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    """The job the flags and the config describe, every value checked (launch/script_values.py) before any is used."""
    values.count("--nodes", args.nodes, 1, expected="at least 1")
    values.count("--gpus-per-node", args.gpus_per_node, 0)
    values.count("--tasks-per-node", args.tasks_per_node, 0)
    values.count("--cpus-per-task", args.cpus_per_task, 1)
    values.count("--warn-seconds", args.warn_seconds, 0, values.SIGNAL_SECONDS)
    values.slurm_time("--time", args.time)
    values.partition("--partition", args.partition)
    values.job_name("--job-name", args.job_name)
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    tasks_are_dask = any(step.dask for step in plan(args.stage, args.step))  # an unknown --step fails here
    if tasks_are_dask:
        if args.tasks_per_node > 1:
            raise KDError(f"--tasks-per-node: {args.stage} runs one Dask worker per node, got {args.tasks_per_node}; "
                          "give it more cores with --cpus-per-task")
        dask_block.check_stage_args(args.stage_args)
        tasks = 1
    data = values.stage_command(args.config, args.set, args.stage_args)
    output_dir = data.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise KDError(f"{args.config}: field 'output_dir': the SLURM logs go beside it or in it; set it")
    values.one_line("output_dir", output_dir)
    check_partition(args.partition)
    # data_pipeline's output_dir may be a link into its store (cache_root): its logs go beside the link, not the store
    output_dir = os.path.abspath(output_dir) if tasks_are_dask else str(Path(output_dir).resolve())
    values.log_folder("output_dir", dask_block.log_dir(output_dir) if tasks_are_dask else Path(output_dir) / "slurm")
    return SlurmJob(config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=tasks,
                    output_dir=output_dir, stage=args.stage, cpus_per_task=args.cpus_per_task,
                    time=args.time, partition=args.partition, warn_seconds=args.warn_seconds,
                    job_name=args.job_name or "", sets=list(args.set), step=args.step,
                    stage_args=list(args.stage_args),
                    exports={"DS_ACCELERATOR": "cpu"} if args.gpus_per_node == 0 else {})


def parser() -> argparse.ArgumentParser:
    """The flags of `python -m launch slurm` (tests/launch/test_fuzz.py tries each)."""
    parser = argparse.ArgumentParser(prog="python -m launch slurm", description=__doc__.splitlines()[0])
    add_config_flags(parser)  # the stage's --config / --set, spelled and explained as every stage does
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU (0: CPU nodes)")
    parser.add_argument("--tasks-per-node", type=int, default=0, help="ranks per node (default: one per GPU)")
    parser.add_argument("--cpus-per-task", type=int, default=4)
    parser.add_argument("--time", default=None, help="time limit, e.g. 04:00:00 (the warning signal needs one)")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--warn-seconds", type=int, default=120, help="SIGUSR1 this long before the time limit")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--stage", default="pretrain", choices=STAGES, help="the stage to run")
    parser.add_argument("--step", default=None, help="only this step of the stage (e.g. finetune's distill)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument("stage_args", nargs="*", metavar="-- ARG",
                        help="after --: flags for the stage itself (e.g. -- --arm kd --fold 0)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        job = job_from_args(args)
        check_config(job)
        if args.dry_run:
            print(render(job))
        else:
            submit(job)
    except KDError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    return 0
