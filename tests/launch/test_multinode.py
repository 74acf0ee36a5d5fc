"""The SLURM path on a real multi-host cluster: 2 nodes, each its own network namespace, hostname and slurmd
(launch/testcluster.py), one task per node, so the rendezvous crosses hosts (MASTER_ADDR is another node's address).

Every job's final weights are compared bit for bit with the same config run uninterrupted by `launch local` with 2
processes: a plain 2-node job, a job preempted by SIGUSR1 and requeued, a job whose second node is lost mid-run
(its slurmd and every process on it killed) and that resumes once the node is back, and finetune's KD arm. The
transfer-set pipeline on Dask (a scheduler on node 1, a worker on each node) writes shards byte-identical to a plain
DirectRunner run and leaves no Dask process behind.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from kdlib.cache import read_manifest
from kdlib.runtime.digests import verify_digests
from kdlib.runtime.io import sha256_file
from kdlib.runtime.metrics import read_metrics
from kdlib.training.checkpoints import latest_checkpoint
from launch import testcluster
from tests.pipeline_fixture import corpus_config, run_pipeline
from tests.finetune_fixture import base_config as finetune_config
from tests.kdlib.training.test_elastic import ROUNDING, close
from tests.tiny_models import make_tiny_bert
from tests.transfer_fixture import REPO, base_config, build_transfer_set, export_weights, stage_env, write_config

pytestmark = pytest.mark.slow  # starts a SLURM cluster and trains

STEPS = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with testcluster.running(nodes=2, keep_logs=tmp_path_factory.mktemp("cluster-logs")) as c:
        yield c


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    # dropout 0: the elastic test compares a run resized between 2 ranks and 1, where per-rank dropout streams differ
    return build_transfer_set(tmp_path_factory.mktemp("multinode_fixture"), rows=160, teacher_steps=5, dropout=0.0)


@pytest.fixture(scope="module")
def uninterrupted(paths, tmp_path_factory):
    """The reference: the job's config, never interrupted, as 2 local processes."""
    root = tmp_path_factory.mktemp("reference")
    config = job_config(paths, root / "run", root / "job.yaml")
    done = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "2", "--config", str(config)],
                          cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return export_weights(root / "run" / "export")


def job_config(paths, out: Path, path: Path) -> Path:
    return write_config(base_config(paths, out, steps=STEPS, checkpoint_every=10), path)


def submit(cluster, config: Path, *extra: str, nodes: int = 2) -> str:
    proc = subprocess.run([sys.executable, "-m", "launch", "slurm", "--config", str(config), "--nodes", str(nodes),
                           "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "00:20:00", *extra],
                          cwd=REPO, env=dict(stage_env(), SLURM_CONF=str(cluster.conf)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def wait(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_of(out: Path, job: str) -> str:
    path = out / "slurm" / f"job-{job}.out"
    return path.read_text() if path.is_file() else ""


def wait_until_done(cluster, out: Path, job: str, restart: int = 0, timeout: float = 400) -> str:
    wait(lambda: testcluster.job_state(job, cluster.env) == "" and f"restart {restart} ended" in log_of(out, job),
         timeout, f"job {job} restart {restart} to finish", poll=1.0)
    return log_of(out, job)


def steps_done(out: Path) -> int:
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return max((r["step"] for r in records if r.get("kind", "train") == "train"), default=0)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_2_node_job_trains_exactly_as_2_local_processes(cluster, paths, uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, job_config(paths, out, tmp_path / "job.yaml"))
    text = wait_until_done(cluster, out, job)
    assert f"[launch] job {job} restart 0: 2 tasks on kdnode[1-2], rendezvous kdnode1:" in text
    assert f"[launch] job {job} restart 0 ended with exit code 0" in text
    ranks = out / "slurm" / f"job-{job}" / "restart-0"
    assert sorted(p.name for p in ranks.iterdir()) == ["rank-0.out", "rank-1.out"]
    assert same_weights(export_weights(out / "export"), uninterrupted)


def test_usr1_checkpoints_requeues_under_the_same_id_and_ends_as_the_uninterrupted_run(cluster, paths, uninterrupted,
                                                                                        tmp_path):
    out = tmp_path / "preempted"
    job = submit(cluster, job_config(paths, out, tmp_path / "job.yaml"))
    wait(lambda: steps_done(out) >= 3, 300, "three training steps")
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True)  # what --signal sends
    text = wait_until_done(cluster, out, job, restart=1)
    assert f"[launch] job {job} restart 0 ended with exit code 75" in text  # checkpointed, then requeued
    assert f"requeueing job {job}" in text and f"[launch] job {job} restart 1:" in text
    assert f"[launch] job {job} restart 1 ended with exit code 0" in text
    assert "resumed from" in (out / "slurm" / f"job-{job}" / "restart-1" / "rank-0.out").read_text()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind", "train") == "train"] == \
        list(range(1, STEPS + 1))
    assert same_weights(export_weights(out / "export"), uninterrupted)


def test_a_lost_node_is_named_the_checkpoint_survives_and_the_job_resumes_when_the_node_is_back(
        cluster, paths, uninterrupted, tmp_path):
    out = tmp_path / "lost"
    job = submit(cluster, job_config(paths, out, tmp_path / "job.yaml"))
    wait(lambda: steps_done(out) >= 25, 300, "25 training steps (checkpoints at 10 and 20)")
    testcluster.kill_node(cluster, "kdnode2")  # its slurmd, slurmstepd and rank 1: a power cut
    text = wait(lambda: "Node failure on kdnode2" in log_of(out, job) and log_of(out, job), 120,
                "SLURM to name the lost node in the job's log")
    rank0 = (out / "slurm" / f"job-{job}" / "restart-0" / "rank-0.out").read_text()
    assert re.search(r"error: lost rank 1 on host kdnode2 \(10\.213\.\d+\.12\) during step \d+", rank0), rank0[-3000:]
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None and int(latest.name.split("-")[1]) >= 10
    verify_digests(latest)  # complete and unchanged: every file matches the digests written when it was saved
    wait(lambda: testcluster.job_state(job, cluster.env) == "PENDING", 60, "SLURM to requeue the job")
    testcluster.start_node(cluster, "kdnode2")  # the node is back
    text = wait_until_done(cluster, out, job, restart=1)
    assert f"[launch] job {job} restart 1 resumes from: {out / 'checkpoints' / 'latest'} -> {latest.name}" in text
    assert f"[launch] job {job} restart 1 ended with exit code 0" in text
    assert f"resumed from {latest}" in (out / "slurm" / f"job-{job}" / "restart-1" / "rank-0.out").read_text()
    assert same_weights(export_weights(out / "export"), uninterrupted)


def test_a_job_continues_on_1_node_then_on_2_with_the_same_rows_at_every_step(cluster, paths, tmp_path):
    """Elastic resume across hosts (ZeRO-2: the resized loads go through DeepSpeed's universal checkpoint): 10 steps
    on 2 nodes, 10 more on 1, 10 more on 2, against 30 uninterrupted steps of 2 local processes. The global batch is
    fixed (engine.global_batch), so every step takes the same rows; the losses and weights agree to float32
    rounding (the order in which gradients are summed differs), see tests/kdlib/training/test_elastic.py."""
    def config(out: Path, steps: int) -> Path:
        return write_config(base_config(paths, out, steps=steps, checkpoint_every=10, **{
            "engine.micro_batch": 8, "engine.grad_accum": 1, "engine.global_batch": 16,
            "engine.optim.decay_steps": 30}), out.parent / f"{out.name}-{steps}.yaml")

    out, ref = tmp_path / "elastic", tmp_path / "reference"
    for steps, nodes in ((10, 2), (20, 1), (30, 2)):
        job = submit(cluster, config(out, steps), nodes=nodes)
        text = wait_until_done(cluster, out, job)
        assert f"[launch] job {job} restart 0 ended with exit code 0" in text
        if steps > 10:
            was = 2 if nodes == 1 else 1
            rank0 = (out / "slurm" / f"job-{job}" / "restart-0" / "rank-0.out").read_text()
            assert f"(step {steps - 10}, saved at world size {was}, now {nodes})" in rank0
    done = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "2", "--config", str(config(ref, 30))],
                          cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    mine = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"}
    theirs = {r["step"]: r for r in read_metrics(ref / "metrics.jsonl") if r.get("kind") == "train"}
    assert sorted(mine) == list(range(1, 31))  # the steps continue across both resizes
    assert all(close(mine[s][p], theirs[s][p]) for s in mine for p in ("loss", "kd_topk", "mlm_ce")), \
        [(s, mine[s]["loss"], theirs[s]["loss"]) for s in mine if not close(mine[s]["loss"], theirs[s]["loss"])]
    assert all(mine[s]["epoch"] == theirs[s]["epoch"] for s in mine)
    a, b = export_weights(out / "export"), export_weights(ref / "export")
    scale = max(t.abs().max().item() for t in b.values())
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= ROUNDING * scale


def test_finetune_runs_every_step_on_the_cluster_and_its_kd_arm_equals_2_local_processes(cluster, tmp_path):
    data = finetune_config(tmp_path, folds=2)
    data["evaluation"]["seeds"] = [0]
    data["teacher"]["steps"], data["distill"]["steps"], data["distill"]["eval_every"] = 10, 12, 6  # kept short
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    out = Path(data["output_dir"])
    job = submit(cluster, config, "--stage", "finetune", "--", "--fold", "0", "--arm", "kd")
    text = wait_until_done(cluster, out, job, timeout=600)
    assert f"[launch] job {job} restart 0 ended with exit code 0" in text, text
    logs = out / "slurm" / f"job-{job}" / "restart-0"
    names = sorted(p.name for p in logs.iterdir())
    assert names == sorted(["folds.out", "teacher-rank-0.out", "teacher-rank-1.out", "transfer.out",
                            "distill-rank-0.out", "distill-rank-1.out", "speed.out", "deploy.out", "report.out"])
    kd = out / "fold-0" / "seed-0" / "kd"
    assert (kd / "eval.json").is_file() and (out / "report").is_dir()
    # the same KD run by 2 local processes, from the same teacher and transfer set
    shutil.move(kd, kd.with_name("kd-slurm"))
    local = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "2", "--stage", "finetune", "--step",
                            "distill", "--config", str(config), "--", "--fold", "0", "--arm", "kd"],
                           cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    assert same_weights(export_weights(kd / "export"),
                        export_weights(kd.with_name("kd-slurm") / "export"))


def shard_digests(transfer_set: Path) -> dict[str, str]:
    return {s.file: sha256_file(transfer_set / s.file) for s in read_manifest(transfer_set).shards}


def job_processes(cluster) -> list[str]:
    """Every process on any node but SLURM's own daemons (a Dask worker's spawned child names no "dask" in its
    command line, so nothing is matched by name)."""
    found = []
    for node in cluster.nodes:
        for pid in testcluster.node_pids(cluster, node):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # ended meanwhile
                continue
            if comm not in ("slurmd", "slurmstepd"):
                found.append(f"{node}: {pid} {argv}")
    return found


def test_the_pipeline_on_dask_over_2_nodes_writes_the_same_shards_as_directrunner_and_leaves_nothing(cluster,
                                                                                                     tmp_path):
    teacher = make_tiny_bert(tmp_path / "teacher", task="masked_lm", layers=2, hidden=32, heads=4, seed=0)
    out = tmp_path / "dask"
    config = tmp_path / "dask.yaml"
    config.write_text(yaml.safe_dump(corpus_config(teacher, out)))
    job = submit(cluster, config, "--stage", "data_pipeline")
    wait(lambda: {line.split(":")[0] for line in job_processes(cluster) if " -m dask worker " in line} == {
        "kdnode1", "kdnode2"}, 120, "a Dask worker on each node")  # (what the check after the job would find)
    run_pipeline(tmp_path, corpus_config(teacher, tmp_path / "direct"))  # the reference (DirectRunner), meanwhile
    logs = Path(f"{out}.slurm")  # beside the transfer set: the pipeline refuses a folder with files it did not write

    def log() -> str:
        path = logs / f"job-{job}.out"
        return path.read_text() if path.is_file() else ""
    wait(lambda: testcluster.job_state(job, cluster.env) == "" and "restart 0 ended" in log(), 300,
         f"job {job} to finish", poll=1.0)
    start = logs / f"job-{job}" / "restart-0"
    assert f"[launch] job {job} restart 0 ended with exit code 0" in log(), \
        log() + "".join(p.read_text()[-3000:] for p in start.glob("*.out"))
    assert "[launch] Dask workers and scheduler stopped" in log() and "Killed" not in log()  # they closed themselves
    assert sorted(p.name for p in start.iterdir()) == [  # (the scheduler deleted its file as it closed)
        "dask-scheduler.out", "dask-worker-kdnode1.out", "dask-worker-kdnode2.out", "data_pipeline.out"]
    assert re.search(r"runner: the Dask scheduler of \S+dask-scheduler.json, 2 worker\(s\)",
                     (start / "data_pipeline.out").read_text())
    scheduler = (start / "dask-scheduler.out").read_text()
    for node in cluster.nodes:  # each node's worker ran there (its own address) and joined the scheduler on node 1
        worker = (start / f"dask-worker-{node}.out").read_text()
        assert re.search(rf"Start worker at: +tcp://{re.escape(cluster.address(node))}:", worker), worker
        assert re.search(rf"Registered to: +tcp://{re.escape(cluster.address(cluster.nodes[0]))}:", worker), worker
        assert re.search(rf"Register worker addr: tcp://{re.escape(cluster.address(node))}:\d+ name: {node}\b",
                         scheduler), scheduler
    direct = shard_digests(tmp_path / "direct")
    assert len(direct) == 3 and shard_digests(out) == direct  # every shard byte for byte
    left = job_processes(cluster)
    assert left == [], left  # no scheduler, worker, nanny or worker child is left on any node


def test_testcluster_up_status_down_as_a_user_runs_it(tmp_path):
    closed = subprocess.run([sys.executable, "-m", "launch", "testcluster", "up", "--dir", str(tmp_path / "c")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)  # pytest's folders are 0700
    assert closed.returncode == 2 and closed.stderr.count("error: ") == 1 and "closed to other users" in closed.stderr
    assert "Traceback" not in closed.stderr and not (tmp_path / "c").exists()
    root = Path(tempfile.mkdtemp(prefix="kd-cluster-test-", dir="/tmp")) / "cluster"
    root.parent.chmod(0o755)

    def command(*args):
        return subprocess.run([sys.executable, "-m", "launch", "testcluster", *args, "--dir", str(root)], cwd=REPO,
                              capture_output=True, text=True, timeout=180)

    up = command("up", "--nodes", "2")
    try:
        assert up.returncode == 0, up.stderr
        c = testcluster.Cluster.load(root)
        assert f"export SLURM_CONF={root / 'slurm.conf'}" in up.stdout
        # each node is its own host: its own hostname and address, reached across the bridge
        hosts = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "sh", "-c", "echo $(hostname) $(hostname -I)"],
                               env=c.env, capture_output=True, text=True, timeout=60)
        assert sorted(hosts.stdout.split("\n")[:2]) == sorted(f"{n} {c.address(n)}" for n in c.nodes), hosts.stderr
        # 2 nodes x 2 tasks under plain srun: each rank's place, as the stages read it, from SLURM's variables
        probe = "from kdlib.runtime.process_group import dist_env; import socket; e = dist_env(); " \
                "print(socket.gethostname(), e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port)"
        places = subprocess.run(["srun", "-N2", "--ntasks-per-node=2", sys.executable, "-c", probe], env=c.env,
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        rows = sorted(line.split() for line in places.stdout.splitlines())
        job = rows[0][5] if rows else ""
        assert rows == [["kdnode1", "0", "0", "4", "kdnode1", job], ["kdnode1", "1", "1", "4", "kdnode1", job],
                        ["kdnode2", "2", "0", "4", "kdnode1", job], ["kdnode2", "3", "1", "4", "kdnode1", job]], \
            places.stderr
        again = command("up")  # a second cluster in the same folder is refused, the first left alone
        assert again.returncode == 2 and again.stderr.startswith("error: ") and "exists" in again.stderr
        assert "idle" in command("status").stdout
    finally:
        down = command("down")
    assert down.returncode == 0, down.stderr
    assert not root.exists()
    root.parent.rmdir()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert c.prefix not in netns and c.prefix not in links  # nothing of the cluster is left on the machine
    assert command("down").returncode == 2  # nothing to stop: one line, exit 2
