"""The transfer-set pipeline on a Dask cluster: what `launch slurm --stage data_pipeline` puts in its sbatch script
and what `launch local --stage data_pipeline` adds to the command.

In one SLURM allocation of N nodes the script starts a Dask scheduler on the first node (`srun --overlap`, one
task, so it shares that node with the worker there), waits for its scheduler file, starts one worker per node
(one srun over all N nodes, each worker named after its node), runs `python -m data_pipeline ... --runner dask
--scheduler-file F --min-workers N` once in the batch shell, then stops the workers and the scheduler (an EXIT
trap, so also when the pipeline fails or the scheduler never starts: the scheduler is asked to close itself and
its workers, and srun kills whatever is left after STOP_GRACE_S) and exits with the pipeline's status.

Why srun and not dask-jobqueue: dask-jobqueue's SLURMCluster submits one SLURM job per worker from a client
process that must stay alive on the login node while the workers queue one by one; our launcher renders one
allocation that a user can read, edit, requeue and `scancel` as a whole, as for every other stage. Inside that
allocation srun is all it takes, and no process outlives the job.

Logs go to `<output_dir>.slurm/`, beside output_dir, not in it: data_pipeline refuses an output_dir holding files
it did not write (kdlib/runtime/outputs.py check_output_folder), and `overwrite: true` swaps the whole folder.
"""

from __future__ import annotations

from pathlib import Path

from kdlib.errors import KDError
from launch.script_values import quote as q, shell_line

# The flags the launcher sets itself; a stage argument naming one would contradict the script.
LAUNCHER_FLAGS = ("--runner", "--scheduler", "--scheduler-file", "--min-workers", "--local-workers")
STOP_GRACE_S = 30  # how long the scheduler gets to close itself and its workers before srun kills them
SHUTDOWN = "import sys; from distributed import Client; Client(scheduler_file=sys.argv[1], timeout=10).shutdown()"
START_TIMEOUT_S = 120  # how long the script waits for the scheduler's file


def log_dir(output_dir: str) -> Path:
    """`<output_dir>.slurm`: the job's log folder, beside the transfer set."""
    return Path(f"{Path(output_dir)}.slurm")


def check_stage_args(stage_args: list[str]) -> None:
    """Refuse a stage argument that names a flag the launcher sets (`--runner`, `--scheduler-file`, ...)."""
    for arg in stage_args:
        if arg.split("=", 1)[0] in LAUNCHER_FLAGS:
            raise KDError(f"-- {arg}: the launcher sets {', '.join(LAUNCHER_FLAGS[:4])} (and --local-workers "
                          "locally) itself for data_pipeline; leave it out")


def local_args(nproc: int) -> list[str]:
    """`launch local --nproc N`: N > 1 runs the pipeline on N local Dask workers; 1 runs it as the stage does
    by itself (Beam's DirectRunner)."""
    return ["--runner", "dask", "--local-workers", str(nproc)] if nproc > 1 else []


def block(pipeline: list[str], python: str, workdir: str, nodes: int, log_name: str) -> str:
    """The script's lines: scheduler, workers, the pipeline (`pipeline` is its argv without the Dask flags), stop.
    `$ranks` (this start's log folder) and `$MASTER_ADDR` (the first host) are set by the template above."""
    dask = f"{q(python)} -m dask"
    argv = shell_line(pipeline)
    name_it = q('exec "$@" --name "$SLURMD_NODENAME"')  # each worker is named after its node
    return f"""# Dask (launch/dask_block.py): a scheduler on the first node, one worker on every node, the pipeline once
# here as their client; an EXIT trap stops workers and scheduler (also on a failure). Logs: dask-*.out beside it.
export PYTHONPATH={q(workdir)}${{PYTHONPATH:+:$PYTHONPATH}}  # the workers import the pipeline's code
scheduler_file="$ranks/dask-scheduler.json"
scheduler_pid=""
workers_pid=""
stop_dask() {{  # the scheduler closes its workers and itself; srun kills what is left after {STOP_GRACE_S} s (SIGTERM)
  local pids="$workers_pid $scheduler_pid"
  [ -n "${{pids// /}}" ] || return 0
  if [ -s "$scheduler_file" ] && timeout {STOP_GRACE_S} {q(python)} -c {q(SHUTDOWN)} "$scheduler_file" >/dev/null 2>&1; then
    for _ in $(seq 1 {STOP_GRACE_S * 2}); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
  fi
  if kill -0 $pids 2>/dev/null; then
    echo "[launch] the Dask scheduler did not close its workers within {STOP_GRACE_S} s: srun kills them"
    kill -TERM $pids 2>/dev/null
  fi
  wait $pids 2>/dev/null
  echo "[launch] Dask workers and scheduler stopped"
}}
trap stop_dask EXIT
srun --overlap --nodes=1 --ntasks=1 --nodelist="$MASTER_ADDR" --output="$ranks/dask-scheduler.out" \\
  {dask} scheduler --scheduler-file "$scheduler_file" --host "$MASTER_ADDR" --port 0 --no-dashboard &
scheduler_pid=$!
for _ in $(seq 1 {START_TIMEOUT_S * 2}); do
  if [ -s "$scheduler_file" ] || ! kill -0 "$scheduler_pid" 2>/dev/null; then break; fi
  sleep 0.5
done
if [ -s "$scheduler_file" ]; then
  srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --output="$ranks/dask-worker-%N.out" \\
    sh -c {name_it} sh {dask} worker --scheduler-file "$scheduler_file" --nworkers 1 --nthreads 1 --no-dashboard &
  workers_pid=$!
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 {argv} --runner dask --scheduler-file "$scheduler_file" --min-workers {nodes} \\
    >"$ranks/{log_name}" 2>&1
  code=$?
else
  echo "[launch] the Dask scheduler did not write $scheduler_file within {START_TIMEOUT_S} s: see $ranks/dask-scheduler.out"
  code=1
fi"""
