"""A real single-node SLURM cluster on localhost for the tests: Debian's slurm-wlm packages (installed here
when missing: the tests run as root on CI, like .ci/run), munged with its socket in a test folder, slurmctld
and slurmd on free ports, 2 CPUs, one partition, no accounting. Stopped by the fixture that started it.
`cred_expire=10`: SLURM holds a requeued job for cred_expire seconds (120 by default) so that the old
job credential, revoked by the requeue, has expired when it restarts; forcing an earlier start instead
fails the restart with "Job credential revoked".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from kdlib.runtime.process_group import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def install() -> None:
    """apt-get the daemons once per machine (no service starts by itself)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed and this is not root: apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True)


def _conf(root: Path) -> str:
    return f"""ClusterName=kdtest
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().strip())
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear: the daemon did not start (see {path.parent}/log)")


@contextmanager
def single_node_cluster(keep_logs: Optional[Path] = None) -> Iterator[dict]:
    """Start munged, slurmctld, slurmd; yield the environment (SLURM_CONF) for sbatch and friends; stop them."""
    install()
    # munged runs as the munge user, which cannot enter pytest's private (0700) folders: the cluster lives in
    # a folder of its own under /tmp (0755), removed at the end
    root = Path(tempfile.mkdtemp(prefix="kd-slurm-"))
    os.chmod(root, 0o755)
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.chown(root / "munge", "munge", "munge")
    conf = root / "slurm.conf"
    conf.write_text(_conf(root))
    env = dict(os.environ, SLURM_CONF=str(conf))
    pids: list[int] = []
    try:
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c",
                        f"/usr/sbin/munged --socket={root}/munge/munge.socket --pid-file={root}/munge/munged.pid "
                        f"--log-file={root}/munge/munged.log --seed-file={root}/munge/seed"], check=True)
        pids.append(_pid(root / "munge" / "munged.pid"))
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        pids.append(_pid(root / "slurmctld.pid"))
        subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True, env=env)
        pids.append(_pid(root / "slurmd.pid"))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the node never became idle (sinfo: {state!r}; logs in {root / 'log'})")
        yield env
    finally:
        for pid in reversed(pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        for pid in pids:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        if keep_logs is not None:  # what the daemons said, for a failing test to show
            shutil.copytree(root / "log", keep_logs, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def job_state(job_id: str, env: dict) -> str:
    """PENDING / RUNNING / ..., or "" once the job has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip()
