"""The pipeline on a real Dask cluster (`dask scheduler` / `dask worker` processes): the same bytes as the
DirectRunner, a killed worker costs only recomputation, a killed scheduler is one error line and a rerun finishes
the set from the shards it kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdlib.cache import read_manifest
from kdlib.runtime.io import sha256_file
from tests.paths import REPO_ROOT
from tests.pipeline_fixture import corpus_config, run_pipeline

pytestmark = pytest.mark.slow  # starts Dask clusters and Beam

DASK = str(Path(sys.executable).with_name("dask"))


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((directory / "shards").iterdir())}


def assert_same_set(expected: Path, actual: Path) -> None:
    """Shard files byte-identical; manifest equal but for its timing fields and the folder it names."""
    assert file_digests(actual) == file_digests(expected)
    a, b = read_manifest(expected), read_manifest(actual)
    assert a.config_hash == b.config_hash and a.shards == b.shards and a.fidelity == b.fidelity
    ta, tb = dict(a.totals), dict(b.totals)
    ta.pop("seconds"), tb.pop("seconds")
    assert ta == tb


class Cluster:
    """A scheduler and N workers as separate processes, each killable, started as a user would on nodes."""

    def __init__(self, folder: Path, workers: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "scheduler.json"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        logs = [open(folder / f"{name}.log", "w") for name in ["scheduler"] + [f"w{i}" for i in range(workers)]]
        self.scheduler = subprocess.Popen([DASK, "scheduler", "--scheduler-file", str(self.file), "--port", "0",
                                           "--no-dashboard"], cwd=REPO_ROOT, env=env, stdout=logs[0],
                                          stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while not self.file.is_file() and time.time() < deadline:
            time.sleep(0.2)
        self.workers = [subprocess.Popen([DASK, "worker", "--scheduler-file", str(self.file), "--nthreads", "1",
                                          "--no-nanny", "--no-dashboard", "--name", f"w{i}"], cwd=REPO_ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs[1:])]

    def stop(self) -> None:
        for proc in self.workers + [self.scheduler]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def run_and_kill(work: Path, cfg: dict, args: list[str], victim, out: Path) -> subprocess.CompletedProcess:
    """Run the pipeline; SIGKILL `victim` (a process) as soon as the first shard of `out` is written."""
    path = work / f"dask-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline", "--config", str(path), *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((out / "shards").glob("*.json")):
        time.sleep(0.05)
    assert proc.poll() is None, "the pipeline ended before a shard was written: nothing was killed mid-run"
    assert not (out / "manifest.json").exists()
    os.kill(victim.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_a_killed_worker_costs_recomputation_only(work, teacher, reference):
    cluster = Cluster(work / "cluster-worker", workers=2)
    out = work / "dask-worker-killed"
    try:
        proc = run_and_kill(work, corpus_config(teacher, out),
                            ["--runner", "dask", "--scheduler-file", str(cluster.file), "--min-workers", "2"],
                            cluster.workers[0], out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 worker(s)" in proc.stdout
    finally:
        cluster.stop()
    assert_same_set(reference, out)


def test_a_killed_scheduler_is_one_error_line_and_a_rerun_finishes_the_set(work, teacher, reference):
    cluster = Cluster(work / "cluster-scheduler", workers=1)  # one: shards are still to do when it dies
    out = work / "dask-scheduler-killed"
    cfg = corpus_config(teacher, out)
    try:
        proc = run_and_kill(work, cfg, ["--runner", "dask", "--scheduler-file", str(cluster.file)],
                            cluster.scheduler, out)
    finally:
        cluster.stop()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost the Dask scheduler" in errors[0] and "rerun" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "manifest.json").exists(), "a run that lost its scheduler must not write a manifest"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("*.parquet")}
    assert kept, "the killed run should have kept its finished shard"

    rerun = run_pipeline(work, cfg, ["--runner", "dask", "--local-workers", "2"])  # a fresh cluster, here
    assert "a local Dask cluster of 2 workers" in rerun.stdout
    assert {name: (out / "shards" / name).stat() for name in kept} and all(
        ((out / "shards" / name).stat().st_ino, (out / "shards" / name).stat().st_mtime_ns) == stamp
        for name, stamp in kept.items()), "a finished shard was rewritten instead of kept"
    assert_same_set(reference, out)
    assert json.loads((out / "manifest.json").read_text())["config_hash"] == read_manifest(reference).config_hash


def test_runner_flags_are_checked_before_any_work(work, teacher):
    out = work / "dask-flags"
    cases = {("--scheduler", "tcp://127.0.0.1:8786"): "--scheduler: only with --runner dask",
             ("--runner", "dask", "--scheduler", "tcp://host:99999"): "--scheduler: expected tcp://HOST:PORT",
             ("--runner", "dask", "--scheduler", "tcp://h:1", "--local-workers", "2"): "--local-workers: give one of",
             ("--runner", "dask", "--local-workers", "0"): "--local-workers: expected 1..256"}
    for args, message in cases.items():
        proc = run_pipeline(work, corpus_config(teacher, out), list(args), check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (args, proc.stderr[-2000:])
        assert not out.exists()
    proc = run_pipeline(work, corpus_config(teacher, out), ["--check", "--runner", "dask", "--local-workers", "2"])
    assert proc.stdout.strip().endswith(": valid") and not out.exists()  # what `launch slurm` asks before it submits
