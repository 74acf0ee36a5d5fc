"""launch/dask_block.py: the sbatch script of `launch slurm --stage data_pipeline`, read as text, checked by bash's
parser, and run by bash with stand-ins for srun, scontrol and python that record what they were asked to do (so the
order, the quoting, the exit status and the stop of the Dask processes are checked here, without SLURM); and
`launch local --stage data_pipeline`. The same script on a real 2-node cluster: tests/launch/test_dask_slurm.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from kdlib.errors import KDError
from launch import dask_block, local
from launch.slurm import SlurmJob, render
from tests.transfer_fixture import REPO

SRUN = f"""#!{sys.executable}
import json, os, signal, sys, time
args = sys.argv[1:]
record = os.environ["STUB_RECORD"]
role = "worker" if "worker" in args else "scheduler"
with open(os.path.join(record, "srun.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
def stop(*_):
    open(os.path.join(record, role + ".stopped"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(record, role + ".started"), "w").close()
if role == "scheduler":
    if os.environ.get("STUB_NO_SCHEDULER"):
        sys.exit(1)
    with open(args[args.index("--scheduler-file") + 1], "w") as f:
        f.write('{{"address": "tcp://10.0.0.1:1234"}}')
while not os.path.exists(os.path.join(record, "shutdown")):  # what Client.shutdown() does to the real ones
    time.sleep(0.05)
open(os.path.join(record, role + ".closed"), "w").close()
"""
SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] && printf 'kdnode1\\nkdnode2\\nkdnode3\\n'
"""
PYTHON = f"""#!{sys.executable}
import json, os, sys, time
record = os.environ["STUB_RECORD"]
with open(os.path.join(record, "python.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
for _ in range(200):  # the pipeline waits for its workers (--min-workers)
    if "data_pipeline" not in sys.argv or os.path.exists(os.path.join(record, "worker.started")):
        break
    time.sleep(0.05)
if sys.argv[1] == "-c" and "shutdown()" in sys.argv[2]:  # the stop: the scheduler closes itself and its workers
    if os.environ.get("STUB_NO_SHUTDOWN"):
        sys.exit(1)
    open(os.path.join(record, "shutdown"), "w").close()
sys.exit(int(os.environ.get("STUB_EXIT", "0")) if "data_pipeline" in sys.argv else 0)
"""


def stubs(tmp: Path) -> Path:
    folder = tmp / "bin"
    folder.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
        (folder / name).write_text(text)
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def dask_job(tmp: Path, nodes: int = 3, output_dir: str = "", **over) -> SlurmJob:
    work = tmp / "work"  # the job's folder: a `$(touch pwned)` that were run would land here
    work.mkdir(exist_ok=True)
    return SlurmJob(config=str(tmp / "dp.yaml"), nodes=nodes, gpus_per_node=0, tasks_per_node=1,
                    output_dir=output_dir or str(tmp / "transfer"), stage="data_pipeline", cpus_per_task=2,
                    python=str(tmp / "bin" / "python"), workdir=str(work), **over)


def run_script(tmp: Path, script: str, **env) -> tuple[subprocess.CompletedProcess, list[list[str]], list[list[str]]]:
    (tmp / "record").mkdir()
    path = tmp / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60, env=dict(
        os.environ, PATH=f"{tmp / 'bin'}:{os.environ['PATH']}", STUB_RECORD=str(tmp / "record"), SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="kdnode[1-3]", SLURM_NTASKS="3", **env))

    def calls(name: str) -> list[list[str]]:
        path = tmp / "record" / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return proc, calls("srun.jsonl"), calls("python.jsonl")


def split_srun(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """srun's own options (all written --name=value) and the command after them."""
    at = next(i for i, word in enumerate(argv) if not word.startswith("--"))
    return dict(word[2:].split("=", 1) if "=" in word else (word[2:], "") for word in argv[:at]), argv[at:]


def test_the_script_starts_a_scheduler_on_node_1_a_worker_per_node_then_the_pipeline_with_their_file(tmp_path):
    script = render(dask_job(tmp_path, nodes=3))
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=2",
                 f'#SBATCH --output="{tmp_path}/transfer.slurm/job-%j.out"', "trap stop_dask EXIT"):
        assert line in lines, (line, script)
    assert not [line for line in lines if line.startswith("#SBATCH --signal")]
    sruns = [line.strip() for line in lines if line.strip().startswith("srun ")]
    assert sruns == ['srun --overlap --nodes=1 --ntasks=1 --nodelist="$MASTER_ADDR" '
                     '--output="$ranks/dask-scheduler.out" \\',
                     'srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --output="$ranks/dask-worker-%N.out" \\']
    pipeline = [line for line in lines if " -m data_pipeline " in line]
    assert len(pipeline) == 1 and pipeline[0].endswith(
        ' --runner dask --scheduler-file "$scheduler_file" --min-workers 3 \\')
    assert 'scheduler_file="$ranks/dask-scheduler.json"' in lines
    assert f"ranks={shlex.quote(str(tmp_path / 'transfer.slurm'))}/job-$SLURM_JOB_ID/" in script


def test_run_by_bash_it_passes_every_value_as_typed_stops_the_dask_processes_and_exits_with_the_pipelines_status(
        tmp_path):
    stubs(tmp_path)
    hostile = str(tmp_path / "out dir $(touch pwned) `touch pwned2`")  # spaces, a $( ) and backquotes
    typed = "name=it's a \"value\" with $HOME"
    proc, sruns, pythons = run_script(tmp_path, render(dask_job(tmp_path, output_dir=hostile, sets=[typed],
                                                                stage_args=["--dask_npartitions", "4"])),
                                      STUB_EXIT="3")
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the pipeline's own status
    log = Path(f"{hostile}.slurm") / "job-7" / "restart-0"
    assert "[launch] job 7 restart 0 ended with exit code 3\n[launch] Dask workers and scheduler stopped\n" in proc.stdout
    assert not list((tmp_path / "work").iterdir()) and not list(tmp_path.glob("pwned*"))  # nothing ran from a value
    (scheduler, scheduler_cmd), (workers, worker_cmd) = (split_srun(argv) for argv in sruns)
    assert scheduler == {"overlap": "", "nodes": "1", "ntasks": "1", "nodelist": "kdnode1",
                         "output": f"{log}/dask-scheduler.out"}
    assert scheduler_cmd == [str(tmp_path / "bin" / "python"), "-m", "dask", "scheduler", "--scheduler-file",
                             f"{log}/dask-scheduler.json", "--host", "kdnode1", "--port", "0", "--no-dashboard"]
    assert workers == {"nodes": "3", "ntasks": "3", "ntasks-per-node": "1", "output": f"{log}/dask-worker-%N.out"}
    assert sorted(p.name for p in (tmp_path / "record").glob("*.closed")) == ["scheduler.closed", "worker.closed"]
    assert not list((tmp_path / "record").glob("*.stopped"))  # closed by the scheduler, not killed
    assert pythons == [["-m", "data_pipeline", "--config", str(tmp_path / "dp.yaml"), "--set", typed,
                        "--dask_npartitions", "4", "--runner", "dask", "--scheduler-file",
                        f"{log}/dask-scheduler.json", "--min-workers", "3"],
                       ["-c", dask_block.SHUTDOWN, f"{log}/dask-scheduler.json"]]
    # each worker names itself after its node: the command srun runs, as slurmstepd would on kdnode2
    named = subprocess.run(worker_cmd, env=dict(os.environ, SLURMD_NODENAME="kdnode2",
                                                STUB_RECORD=str(tmp_path / "record")), timeout=30)
    assert named.returncode == 0
    with open(tmp_path / "record" / "python.jsonl") as f:
        assert json.loads(f.read().splitlines()[-1]) == [
            "-m", "dask", "worker", "--scheduler-file", f"{log}/dask-scheduler.json", "--nworkers", "1",
            "--nthreads", "1", "--no-dashboard", "--name", "kdnode2"]


def test_workers_the_scheduler_cannot_close_are_stopped_through_srun_and_the_status_is_the_pipelines(tmp_path):
    stubs(tmp_path)
    proc, sruns, pythons = run_script(tmp_path, render(dask_job(tmp_path)), STUB_NO_SHUTDOWN="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "did not close its workers within 30 s: srun kills them" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "record").glob("*.stopped")) == ["scheduler.stopped", "worker.stopped"]
    assert len(sruns) == 2 and len(pythons) == 2


def test_a_scheduler_that_never_starts_fails_the_job_without_running_the_pipeline(tmp_path):
    stubs(tmp_path)
    proc, sruns, pythons = run_script(tmp_path, render(dask_job(tmp_path)), STUB_NO_SCHEDULER="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"the Dask scheduler did not write \S+/dask-scheduler.json within 120 s", proc.stdout)
    assert len(sruns) == 1 and pythons == []  # no workers, no pipeline


def data_pipeline_slurm(tmp: Path, *args: str, output_dir: str = "",
                        env: Optional[dict] = None) -> subprocess.CompletedProcess:
    config = tmp / "dp.yaml"
    config.write_text(json.dumps({"output_dir": output_dir or str(tmp / "out"),  # YAML reads JSON
                                  "teacher": {"path": str(tmp / "teacher"), "task": "masked_lm"},
                                  "corpus": {"kind": "text", "path": "gensim:lee_background.cor"}}))
    return subprocess.run([sys.executable, "-m", "launch", "slurm", "--stage", "data_pipeline", "--config",
                           str(config), "--dry-run", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("args,output_dir,expected", [
    (["--partition", "debug\nsrun rm -rf ~"], "", "--partition: expected letters"),
    (["--partition", "a b$(id)"], "", "--partition: expected letters"),
    ([], "out\ntouch /tmp/owned", "output_dir: 'out\\ntouch /tmp/owned' holds a control character"),
    (["--tasks-per-node", "2"], "", "--tasks-per-node: data_pipeline runs one Dask worker per node, got 2"),
    (["--", "--runner", "DirectRunner"], "", "-- --runner: the launcher sets --runner"),
    (["--", "--min-workers=1"], "", "-- --min-workers=1: the launcher sets"),
])
def test_a_hostile_or_contradicting_value_is_refused_in_one_line(tmp_path, args, output_dir, expected):
    proc = data_pipeline_slurm(tmp_path, *args, output_dir=output_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists() and not (tmp_path / "out.slurm").exists()


def test_the_cli_checks_the_config_renders_2_nodes_and_writes_nothing(tmp_path):
    proc = data_pipeline_slurm(tmp_path, "--nodes", "2", "--gpus-per-node", "4", "--partition", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --ntasks-per-node=1" in proc.stdout and "#SBATCH --gpus-per-node=4" in proc.stdout
    assert "--min-workers 2 \\" in proc.stdout and "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 " in proc.stdout
    assert not any(tmp_path.glob("out*"))


def test_an_output_dir_that_links_into_the_store_gets_its_logs_beside_the_link(tmp_path):
    (tmp_path / "store" / "key").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "set").symlink_to(tmp_path / "store" / "key")  # what a rerun with cache_root finds
    proc = data_pipeline_slurm(tmp_path, output_dir=str(tmp_path / "runs" / "set"))
    assert proc.returncode == 0, proc.stderr
    assert f'#SBATCH --output="{tmp_path}/runs/set.slurm/job-%j.out"' in proc.stdout.splitlines()


def test_launch_local_runs_the_pipeline_once_on_n_dask_workers_or_plainly(monkeypatch):
    runs = []
    monkeypatch.setattr(local, "run_ranks", lambda argv, nproc, port: runs.append((argv[1:], nproc)) or 0)
    assert local.launch("data_pipeline", "c.yaml", 3, ["num_shards=2"], port=1) == 0
    assert local.launch("data_pipeline", "c.yaml", 1, [], port=1) == 0
    assert runs == [(["-m", "data_pipeline", "--config", "c.yaml", "--set", "num_shards=2", "--runner", "dask",
                      "--local-workers", "3"], 1),
                    (["-m", "data_pipeline", "--config", "c.yaml"], 1)]
    with pytest.raises(KDError, match="-- --scheduler-file: the launcher sets"):
        local.launch("data_pipeline", "c.yaml", 2, [], port=1, stage_args=["--scheduler-file", "x"])
    assert dask_block.log_dir("/data/sets/wiki") == Path("/data/sets/wiki.slurm")
