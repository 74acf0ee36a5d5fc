"""`python -m launch testcluster up [--nodes N] [--dir D] | status | down`: a real multi-host SLURM cluster on one
Linux machine, for trying the SLURM path on a laptop and for the multi-node tests.

Each node is its own host as far as SLURM and the training ranks can tell: a network namespace with its own
address (a veth pair into a bridge the cluster creates), its own hostname (a UTS namespace) and its own
/etc/hosts (a mount namespace with the cluster's hosts file bound over it), and its own slurmd. One slurmctld
runs on the bridge's address in the machine's own namespace (so sbatch, squeue and scancel work from a normal
shell with `SLURM_CONF` set), and one munged, reached by every node through its socket file. The daemons are
Debian's slurm-wlm packages (installed with apt-get when missing). Needs root: namespaces, links and mounts.

Only addresses the cluster creates are used: a free 10.213.X.0/24 (X chosen so that no interface of the
machine already holds an address in it). `down` (and the context manager, also on failure) kills every
process of every node, the daemons, deletes the namespaces, links and the cluster folder. `cluster.json` in the
folder records what was made, so `down` works from another process.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from kdlib.errors import KDError
from kdlib.runtime.cli import stage_parser
from kdlib.runtime.process_group import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DEFAULT_DIR = Path("/tmp/kd-testcluster")
STATE = "cluster.json"
CRED_EXPIRE_S = 10  # SLURM holds a requeued job this long (default 120) so that its revoked credential expires
SLURMD_TIMEOUT_S = 10  # a node whose slurmd stops answering is marked DOWN after this long (default 300)


@dataclass
class Cluster:
    """What `up` made; everything `down` needs to undo it."""

    root: str  # the cluster folder: slurm.conf, hosts, state, spool, logs, munge socket
    prefix: str  # of every namespace and link name (e.g. kd3f1a)
    subnet: str  # e.g. 10.213.57.0/24; the bridge holds .1, node i holds .(10 + i)
    nodes: list[str] = field(default_factory=list)  # node host names: kdnode1 ...
    cpus: int = 2  # CPUs each node offers SLURM
    pids: dict[str, int] = field(default_factory=dict)  # daemon -> pid (munged, slurmctld, slurmd-<node>)

    @property
    def conf(self) -> Path:
        return Path(self.root) / "slurm.conf"

    @property
    def env(self) -> dict:
        """The environment for sbatch / squeue / scontrol from this machine's own shell."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def netns(self, node: str) -> str:
        return f"{self.prefix}n{self.nodes.index(node) + 1}"

    def address(self, node: str) -> str:
        return str(ipaddress.ip_network(self.subnet)[10 + self.nodes.index(node) + 1])

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def controller(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[1])

    def save(self) -> None:
        tmp = Path(self.root) / f".{STATE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(Path(self.root) / STATE)

    @classmethod
    def load(cls, root: Path) -> "Cluster":
        path = root / STATE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise KDError(f"{root}: no {STATE}: no test cluster was started there") from None
        except (ValueError, TypeError) as err:
            raise KDError(f"{path}: not a test cluster's state file ({err})") from None


# ---------------------------------------------------------------- prerequisites


def install() -> None:
    """apt-get the daemons once per machine (no service starts by itself)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True)


def check_prerequisites() -> None:
    if sys.platform != "linux":
        raise KDError("testcluster: needs Linux (network, UTS and mount namespaces)")
    if os.geteuid() != 0:
        raise KDError("testcluster: needs root (it creates network namespaces, links and mounts); run it with sudo")
    missing = [tool for tool in ("ip", "nsenter", "unshare", "mount") if not shutil.which(tool)]
    if missing:
        raise KDError(f"testcluster: {', '.join(missing)} not on PATH (Debian: apt-get install iproute2 util-linux)")
    install()


def _sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(command), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise KDError(f"testcluster: `{' '.join(command)}` failed: {proc.stderr.strip()}")
    return proc


def free_subnet() -> str:
    """A 10.213.X.0/24 that overlaps no address this machine already has."""
    used = [ipaddress.ip_interface(word) for line in _sh("ip", "-o", "-4", "addr").stdout.splitlines()
            for word in line.split()[3:4]]
    choices = list(range(1, 255))
    random.shuffle(choices)
    for x in choices:
        net = ipaddress.ip_network(f"10.213.{x}.0/24")
        if not any(iface.network.overlaps(net) for iface in used):
            return str(net)
    raise KDError("testcluster: every 10.213.X.0/24 overlaps an address of this machine")


# ---------------------------------------------------------------- bring up


def slurm_conf(c: Cluster, ctl_port: int, node_port: int) -> str:
    r = c.root
    nodes = "\n".join(f"NodeName={n} NodeAddr={c.address(n)} CPUs={c.cpus} State=UNKNOWN" for n in c.nodes)
    return f"""ClusterName=kdtest
SlurmctldHost=localhost({c.controller})
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
SlurmdTimeout={SLURMD_TIMEOUT_S}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
{nodes}
PartitionName=debug Nodes={','.join(c.nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().strip())
        time.sleep(0.1)
    raise KDError(f"testcluster: {path} did not appear: the daemon did not start (see {path.parent}/log)")


def _network(c: Cluster) -> None:
    net = ipaddress.ip_network(c.subnet)
    _sh("ip", "link", "add", c.bridge, "type", "bridge")
    _sh("ip", "addr", "add", f"{c.controller}/{net.prefixlen}", "dev", c.bridge)
    _sh("ip", "link", "set", c.bridge, "up")
    for i, node in enumerate(c.nodes, start=1):
        ns, host_end, node_end = c.netns(node), f"{c.prefix}v{i}", f"{c.prefix}p{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
        _sh("ip", "link", "set", node_end, "netns", ns)
        _sh("ip", "link", "set", host_end, "master", c.bridge)
        _sh("ip", "link", "set", host_end, "up")
        for command in (["addr", "add", f"{c.address(node)}/{net.prefixlen}", "dev", node_end],
                        ["link", "set", node_end, "up"], ["link", "set", "lo", "up"]):
            _sh("ip", "netns", "exec", ns, "ip", *command)


def in_node(c: Cluster, node: str, command: str) -> list[str]:
    """argv that runs a shell command on `node`: its network, its hostname, its /etc/hosts. nsenter, not
    `ip netns exec`, which remounts /sys and so hides the cgroup filesystem slurmd needs."""
    return ["nsenter", f"--net=/var/run/netns/{c.netns(node)}", "unshare", "--uts", "--mount", "--propagation",
            "private", "sh", "-c", f"hostname {node} && mount --bind {c.root}/hosts /etc/hosts && {command}"]


def start_node(c: Cluster, node: str) -> None:
    """Start (or restart, after `kill_node`) a node's slurmd and wait until SLURM sees it idle."""
    pid_file = Path(c.root) / f"slurmd-{node}.pid"
    pid_file.unlink(missing_ok=True)
    (Path(c.root) / "spool" / node).mkdir(parents=True, exist_ok=True)
    _sh(*in_node(c, node, f"exec slurmd -f {c.conf} -N {node}"))
    c.pids[f"slurmd-{node}"] = _pid(pid_file)
    c.save()
    wait_idle(c, [node])


def wait_idle(c: Cluster, nodes: list[str], timeout: float = 90) -> None:
    deadline, states = time.time() + timeout, ""
    while time.time() < deadline:
        proc = subprocess.run(["sinfo", "-h", "-N", "-n", ",".join(nodes), "-o", "%N %T"], env=c.env,
                              capture_output=True, text=True)
        states = proc.stdout
        found = dict(line.split() for line in states.splitlines() if line.strip())
        if all(found.get(n) == "idle" for n in nodes):
            return
        time.sleep(0.5)
    raise KDError(f"testcluster: nodes {', '.join(nodes)} never became idle (sinfo: {states.strip()!r}; logs in "
                  f"{c.root}/log)")


def up(nodes: int = 2, root: Path = DEFAULT_DIR, cpus: int = 2) -> Cluster:
    """Make the cluster; on any failure, undo what was made and raise."""
    if nodes < 1:
        raise KDError(f"--nodes: expected at least 1, got {nodes}")
    check_prerequisites()
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise KDError(f"{root}: exists and is not an empty folder; a test cluster makes its own folder "
                      f"(`python -m launch testcluster down --dir {root}` if it holds one)")
    closed = [p for p in Path(root).resolve().parents if p.exists() and not p.stat().st_mode & 0o001]
    if closed:
        raise KDError(f"--dir: {root}: {closed[0]} is closed to other users; munged runs as the munge user and must "
                      "reach its socket in the cluster folder: choose a folder under /tmp")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged runs as the munge user, which must reach its socket folder
    prefix = f"kd{random.randrange(16 ** 4):04x}"
    c = Cluster(root=str(root), prefix=prefix, subnet=free_subnet(), nodes=[f"kdnode{i}" for i in range(1, nodes + 1)],
                cpus=cpus)
    c.save()
    try:
        for sub in ("state", "spool", "log", "munge"):
            (root / sub).mkdir()
        shutil.chown(root / "munge", "munge", "munge")
        hosts = ["127.0.0.1 localhost", f"{c.controller} kdcontroller"] + [f"{c.address(n)} {n}" for n in c.nodes]
        (root / "hosts").write_text("\n".join(hosts) + "\n")
        _network(c)
        c.conf.write_text(slurm_conf(c, free_port(), free_port()))
        _sh("su", "-s", "/bin/sh", "munge", "-c",
            f"/usr/sbin/munged --socket={root}/munge/munge.socket --pid-file={root}/munge/munged.pid "
            f"--log-file={root}/munge/munged.log --seed-file={root}/munge/seed")
        c.pids["munged"] = _pid(root / "munge" / "munged.pid")
        _sh("slurmctld", "-f", str(c.conf))
        c.pids["slurmctld"] = _pid(root / "slurmctld.pid")
        c.save()
        for node in c.nodes:
            start_node(c, node)
    except BaseException:
        down(c)
        raise
    return c


# ---------------------------------------------------------------- faults and tear-down


def node_pids(c: Cluster, node: str) -> list[int]:
    """Every process on `node` (in its network namespace): its slurmd, slurmstepd, the job's tasks."""
    out = _sh("ip", "netns", "pids", c.netns(node), check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_node(c: Cluster, node: str) -> None:
    """The node is lost: SIGKILL to its slurmd and every process on it (what a power cut leaves behind)."""
    for pid in [c.pids.get(f"slurmd-{node}")] + node_pids(c, node):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def down(c: Cluster, keep_logs: Optional[Path] = None) -> None:
    """Kill every node's processes and the daemons; delete namespaces, links and the cluster folder."""
    for node in c.nodes:
        kill_node(c, node)
    for name in ("slurmctld", "munged"):
        if name in c.pids:
            _stop(c.pids[name])
    for i, node in enumerate(c.nodes, start=1):
        _sh("ip", "netns", "del", c.netns(node), check=False)
        _sh("ip", "link", "del", f"{c.prefix}v{i}", check=False)
    _sh("ip", "link", "del", c.bridge, check=False)
    log = Path(c.root) / "log"
    if keep_logs is not None and log.is_dir():  # what the daemons said, for a failing test to show
        shutil.copytree(log, keep_logs, dirs_exist_ok=True)
    shutil.rmtree(c.root, ignore_errors=True)


@contextmanager
def running(nodes: int = 2, root: Optional[Path] = None, keep_logs: Optional[Path] = None) -> Iterator[Cluster]:
    """A cluster for the length of a `with` block (the tests' fixture); torn down also on failure."""
    c = up(nodes, Path(root) if root else Path(tempfile.mkdtemp(prefix="kd-cluster-", dir="/tmp")))
    try:
        yield c
    finally:
        down(c, keep_logs)


def job_state(job_id: str, env: dict) -> str:
    """PENDING / RUNNING / ..., or "" once the job has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip()


# ---------------------------------------------------------------- the command


def main(argv: Optional[list[str]] = None) -> int:
    parser = stage_parser("launch testcluster", __doc__, config=False)
    parser.add_argument("action", choices=("up", "status", "down"), help="start, describe or stop the cluster")
    parser.add_argument("--nodes", type=int, default=2, help="nodes to start (up)")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="CPUs each node offers SLURM (up)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the cluster's folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            if args.cpus_per_node < 1:
                raise KDError(f"--cpus-per-node: expected at least 1, got {args.cpus_per_node}")
            c = up(args.nodes, args.dir, args.cpus_per_node)
        else:
            c = Cluster.load(args.dir)
            if args.action == "down":
                down(c)
                print(f"testcluster: stopped; {c.root} removed")
                return 0
        print(describe(c))
    except KDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def describe(c: Cluster) -> str:
    nodes = "\n".join(f"  {n}  {c.address(n)}  netns {c.netns(n)}" for n in c.nodes)
    sinfo = subprocess.run(["sinfo"], env=c.env, capture_output=True, text=True).stdout.rstrip()
    return (f"test cluster in {c.root} (controller {c.controller}):\n{nodes}\n{sinfo}\n\n"
            f"use it from this shell:   export SLURM_CONF={c.conf}\n"
            f"run a command on a node:  nsenter --net=/var/run/netns/{c.netns(c.nodes[0])} ...\n"
            f"stop it:                  python -m launch testcluster down --dir {c.root}")
