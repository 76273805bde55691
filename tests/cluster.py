"""Real cluster programs for tests: a one-node SLURM cluster on localhost, OpenMPI's mpirun and torchrun.

``.ci/run`` installs Debian's ``slurm-wlm``, ``munge`` and ``openmpi-bin`` (as root); without them, or when not
root, the fixtures and command builders here skip with the reason. Everything listens on loopback only:

* the SLURM daemons bind 127.0.0.1 (``SlurmctldHost``/``NodeAddr`` plus ``NoCtldInAddrAny,NoInAddrAny``; srun's
  own listeners bind what this host's name resolves to, 127.0.0.1 in the test containers);
* mpirun's out-of-band listener and torchrun's TCPStore always bind the wildcard address, so both run in a private
  network namespace that holds only a loopback device (:func:`loopback_netns_prefix`) where ``unshare`` allows it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "`.ci/run` installs it as root: apt-get install --no-install-recommends slurm-wlm munge openmpi-bin"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
OUTER_JOB_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")  # an enclosing job's variables would confuse srun


# ---------------------------------------------------------------------------------------------------- helpers
def which_or_skip(name: str, package: str) -> str:
    """The full path of program ``name``, or skip the test naming the Debian package that holds it."""
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        pytest.skip(f"`{name}` not found (Debian package {package}); {INSTALL_HINT}")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str | bytes | None, lines: int = 40) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def run_command(
    cmd: list[str],
    *,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (text output captured) and return its CompletedProcess; never hangs.

    The command gets its own process group; past ``timeout`` seconds the whole group is killed and
    ``subprocess.TimeoutExpired`` raised with the output so far. ``check=True`` turns a non-zero exit into an
    AssertionError that shows the command and the tails of its stdout and stderr.
    """
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        try:  # a grandchild in another session may still hold the pipes: bounded as well
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = "", ""
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait(timeout=10)
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{_tail(stdout)}\n--- stderr\n{_tail(stderr)}"
        )
    return result


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- loopback-only network namespace
# Runs inside `unshare --net`: bring the namespace's loopback device up (SIOCSIFFLAGS: IFF_UP|IFF_LOOPBACK|
# IFF_RUNNING; the kernel gives it 127.0.0.1 and ::1), point gloo at it (it is the only device) and exec the command.
_LO_UP = (
    "import fcntl,os,socket,struct,sys;"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
    "fcntl.ioctl(s,0x8914,struct.pack('16sh22x',b'lo',0x1|0x8|0x40));s.close();"
    "os.environ.setdefault('GLOO_SOCKET_IFNAME','lo');"
    "os.execvp(sys.argv[1],sys.argv[1:])"
)
_netns_prefix: list[str] | None = None


def loopback_netns_prefix() -> list[str]:
    """Prefix that runs a command in a new network namespace with only ``lo`` (up), or [] where that is not allowed.

    Within it nothing is reachable from, or listens on, the machine's network: the right home for launchers that
    bind the wildcard address (mpirun's OOB listener, torchrun's TCPStore). It also sets GLOO_SOCKET_IFNAME=lo
    unless set. Needs root (CAP_SYS_ADMIN) and util-linux's ``unshare``; probed once per session.
    """
    global _netns_prefix
    if _netns_prefix is None:
        unshare = shutil.which("unshare", path=SBIN_PATH)
        prefix = [unshare, "--net", "--", sys.executable, "-c", _LO_UP] if unshare else []
        if prefix:
            try:
                listen = "import socket; socket.create_server(('127.0.0.1', 0))"
                probe = run_command([*prefix, sys.executable, "-c", listen], timeout=30)
                prefix = prefix if probe.returncode == 0 else []
            except subprocess.TimeoutExpired:
                prefix = []
        _netns_prefix = prefix
    return list(_netns_prefix)


# ---------------------------------------------------------------------------------------- launcher commands
def mpirun_command(n: int) -> list[str]:
    """OpenMPI's ``mpirun`` prefix for ``n`` local processes as root in a container, loopback only (skips if absent)."""
    which_or_skip("mpirun", "openmpi-bin")
    return [
        *loopback_netns_prefix(),
        "mpirun",  # by name: OpenMPI takes an absolute path as --prefix and puts /usr/bin first on the ranks' PATH
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        str(n),
        "--mca",
        "btl",
        "self,tcp",  # no shared-memory BTL: /dev/shm is small in containers
        "--mca",
        "btl_tcp_if_include",
        "lo",
        "--mca",
        "oob_tcp_if_include",
        "lo",
    ]


def torchrun_command(n: int) -> list[str]:
    """The venv's ``torchrun`` prefix for ``n`` processes on one node, c10d rendezvous on 127.0.0.1 (script next)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"`torchrun` not found next to {sys.executable}: pip install -e .[test] installs torch")
    return [
        *loopback_netns_prefix(),
        str(torchrun),
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(n),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--local-addr",
        "127.0.0.1",  # MASTER_ADDR: not whatever this host's name resolves to
    ]


# ------------------------------------------------------------------------------------------ SLURM cluster
@dataclass
class SlurmCluster:
    """A running one-node SLURM cluster; pass ``env`` to every srun/sbatch/squeue/scontrol subprocess."""

    root: Path  # the temporary folder with slurm.conf, munge key and socket, state, spool and logs
    env: dict[str, str]  # os.environ without an enclosing job's SLURM_* variables, plus SLURM_CONF
    node: str
    partition: str
    cpus: int
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def logs(self, lines: int = 30) -> str:
        """The tails of every daemon's log (for failure messages)."""
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts.append(f"--- {path.name}\n{_tail(path.read_text(errors='replace'), lines)}")
        return "\n".join(parts)

    def node_state(self) -> str:
        result = run_command(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], env=self.env, timeout=15)
        return result.stdout.strip() if result.returncode == 0 else f"sinfo failed: {result.stderr.strip()}"


SLURM_PROGRAMS = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "srun": "slurm-client",
    "sbatch": "slurm-client",
    "scontrol": "slurm-client",
    "sinfo": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "munged": "munge",
}


def _slurm_cpus(slurmd: str) -> int:
    """The CPU count slurmd itself detects (``slurmd -C``), so the node never drains for "Low CPU count"."""
    try:
        out = run_command([slurmd, "-C"], timeout=30).stdout
        for word in out.split():
            if word.startswith("CPUs="):
                return int(word.split("=", 1)[1])
    except (subprocess.TimeoutExpired, ValueError):
        pass
    return os.cpu_count() or 1


def _write_slurm_conf(root: Path, node: str, partition: str, cpus: int, munge_socket: Path) -> Path:
    host = socket.gethostname().split(".")[0]  # slurmctld runs only where SlurmctldHost names this host
    lines = {
        "ClusterName": "liltds",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "CommunicationParameters": "NoCtldInAddrAny,NoInAddrAny",  # bind the configured address, not 0.0.0.0
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={munge_socket}",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmdPidFile": root / "slurmd.pid",
        "SlurmctldLogFile": root / "slurmctld.log",
        "SlurmdLogFile": root / "slurmd.log",
        "ProctrackType": "proctrack/linuxproc",  # no cgroups, no systemd
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "MailProg": "/bin/true",  # the default /bin/mail is absent: only a logged error, but a misleading one
        "MpiDefault": "none",  # `srun --mpi=pmi2` works too
        "ReturnToService": 2,
        "SchedulerType": "sched/backfill",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "SlurmctldTimeout": 30,
        "SlurmdTimeout": 30,
        "InactiveLimit": 0,
        "KillWait": 5,
        "MinJobAge": 5,  # sbatch --wait polls every 2 s only while 2 >= MinJobAge / 2 (else at 2, 10, 42 s)
        "NodeName": f"{node} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} State=UNKNOWN",
        "PartitionName": f"{partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    }
    conf = root / "slurm.conf"
    conf.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return conf


def _start(cluster: SlurmCluster, name: str, cmd: list[str]) -> None:
    with open(cluster.root / f"{name}.stdout.log", "wb") as out:  # early fatal errors land here, before the log
        cluster.procs[name] = subprocess.Popen(
            cmd, env=cluster.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for(cluster: SlurmCluster, what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = {name: p.returncode for name, p in cluster.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"waiting for {what}: daemons exited {dead}\n{cluster.logs()}")
        time.sleep(0.25)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s\n{cluster.logs()}")


def _processes_holding(root: Path) -> list[int]:
    """Processes (not this one) with a file under ``root`` open: stray slurmstepds log to slurmd.log."""
    pids, prefix = [], str(root) + os.sep
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_slurm_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs, stop its daemons (slurmd, slurmctld, munged) and anything still using its folder."""
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        try:
            run_command(["scancel", "--user", str(os.getuid())], env=cluster.env, timeout=15)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                q = run_command(["squeue", "-h", "-o", "%i"], env=cluster.env, timeout=15)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass
    for name in ("slurmd", "slurmctld", "munged"):  # reverse start order
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait(timeout=10)
    strays = _processes_holding(cluster.root)
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while strays and time.monotonic() < deadline:  # until they are gone (or zombies waiting for their parent)
        strays = [pid for pid in strays if _alive(pid)]
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_slurm_cluster(
    root: Path, node: str = "liltnode", partition: str = "lilt", timeout: float = 60
) -> SlurmCluster:
    """Start munged, slurmctld and ``slurmd -N node`` in ``root``; return when the node is idle (else raise)."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster runs its daemons as root (SlurmUser=root): run the tests as root")
    paths = {name: which_or_skip(name, package) for name, package in SLURM_PROGRAMS.items()}
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses keys and sockets in folders others can write
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    munge_socket = root / "munge.sock"
    if len(str(munge_socket)) > 100:  # AF_UNIX paths stop at 108 bytes
        raise RuntimeError(f"{root} is too long a path for munged's socket; use a shorter --basetemp")
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))  # what `mungekey` makes: 1024 random bits
    key.chmod(0o600)

    env = {k: v for k, v in os.environ.items() if not k.startswith(OUTER_JOB_PREFIXES)}
    env["PATH"] = SBIN_PATH
    cpus = _slurm_cpus(paths["slurmd"])
    conf = _write_slurm_conf(root, node, partition, cpus, munge_socket)
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root=root, env=env, node=node, partition=partition, cpus=cpus, conf=conf)
    try:
        _start(
            cluster,
            "munged",
            [
                paths["munged"],
                "--foreground",
                "--force",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--pid-file={root / 'munged.pid'}",
                f"--log-file={root / 'munged.log'}",
                f"--seed-file={root / 'munged.seed'}",
                "--num-threads=2",
            ],
        )
        _wait_for(cluster, "munged's socket", munge_socket.exists, timeout)
        _start(cluster, "slurmctld", [paths["slurmctld"], "-D", "-c", "-i", "-f", str(conf)])
        _start(cluster, "slurmd", [paths["slurmd"], "-D", "-N", node, "-f", str(conf)])
        _wait_for(cluster, f"node {node} idle", lambda: cluster.node_state() == "idle", timeout)
    except BaseException:
        stop_slurm_cluster(cluster)
        raise
    return cluster


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory):
    """``slurm_cluster``: a one-node SLURM cluster on 127.0.0.1 for the session (``.env``, ``.node``, ``.partition``).

    Use it with ``from tests.cluster import slurm_cluster_fixture  # noqa: F401`` in the test module.

    Skips without root or the programs; raises with the daemons' log tails if the node is not idle within 60 s;
    stops every daemon it started at the end, whatever the tests did.
    """
    cluster = start_slurm_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_slurm_cluster(cluster)
