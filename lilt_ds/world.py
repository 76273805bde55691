"""Which program started this process, and the world of ranks it says this process belongs to.

torch's process group reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. The
deepspeed launcher and torchrun set them; a scheduler or an MPI launcher sets its own variables
instead: ``srun`` (SLURM_PROCID, ...), OpenMPI's ``mpirun`` (OMPI_COMM_WORLD_*), MPICH's and Intel
MPI's (PMI_RANK, ...). This module translates those, so that every launcher forms one world of N
ranks, and refuses to start where the variables say N > 1 tasks but this process cannot join them
(N one-rank runs writing into one folder would be the silent alternative).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_PORT = 29500
"""MASTER_PORT when an MPI launcher leaves it unset (torch's and DeepSpeed's default)."""

PLAIN = "python"
"""The launcher of a process that no launcher started: a world of one."""

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000
"""Under SLURM without MASTER_PORT: 15000 + job id mod 20000, so jobs sharing a node differ."""


@dataclass(frozen=True)
class LaunchedWorld:
    """This process's place, as its launcher says: what torch's ``env://`` rendezvous needs."""

    launcher: str  # who started it (for the log): deepspeed/torchrun, srun, OpenMPI's mpirun, MPICH's mpiexec, python
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_world_size: int | None = None

    def environment(self) -> dict[str, str]:
        env = {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }
        if self.local_world_size is not None:
            env["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        return env


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not a number") from None


def _read(env: Mapping[str, str], names: tuple[str, ...]) -> str:
    return ", ".join(f"{n}={env[n]}" for n in names if n in env)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist (``gpu-[003-005,007],cpu1`` -> ``gpu-003``), as
    ``scontrol show hostnames`` would print first."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first top-level entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    # each bracket group's first value, its zero padding kept
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)


def _master(env: Mapping[str, str], single_node: bool, launcher: str, read: tuple[str, ...], fix: str) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if single_node:
        return "127.0.0.1"
    raise ConfigError(
        f"{launcher} started this process in a world on several nodes ({_read(env, read)}), but MASTER_ADDR is "
        f"not set and {launcher} does not say where rank 0 runs: {fix}"
    )


def _mpi(env: Mapping[str, str], launcher: str, names: tuple[str, str, str, str], fix: str) -> LaunchedWorld:
    rank_name, size_name, local_name, local_size_name = names
    rank, size = _int(env, rank_name), _int(env, size_name)
    local = _int(env, local_name) if local_name in env else None
    local_size = _int(env, local_size_name) if local_size_name in env else None
    if local is None:
        if size > 1:
            raise ConfigError(
                f"{launcher} started this process as one of {size} ({_read(env, names)}), but {local_name} is not "
                f"set, so its device on the node is unknown: use a {launcher} that sets it, or the deepspeed launcher"
            )
        local = 0
    master = _master(env, local_size == size, launcher, names, fix)
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_PORT
    return LaunchedWorld(launcher, rank, local, size, master, port, local_size)


def _slurm(env: Mapping[str, str]) -> LaunchedWorld | None:
    tasks_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    read = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if "SLURM_STEP_NUM_TASKS" not in env:  # the batch script itself, or salloc's shell: not an srun task
        if "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
            raise ConfigError(
                f"SLURM gave this job {env['SLURM_NTASKS']} tasks ({_read(env, read)}), but this process was not "
                "started by srun (SLURM_STEP_NUM_TASKS is not set), so it would train alone: start it with "
                "`srun python -m lilt_ds.cli.pretrain ...` (one process per task), or with "
                "`deepspeed --launcher slurm ...`, or ask SLURM for one task (#SBATCH -n 1) for a single process"
            )
        return None
    size, rank = _int(env, tasks_name), _int(env, "SLURM_PROCID")
    local = _int(env, "SLURM_LOCALID")
    nodes = _int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else _int(env, "SLURM_NNODES")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if env.get("MASTER_ADDR"):
        master = env["MASTER_ADDR"]
    elif nodes == 1:
        master = "127.0.0.1"
    elif nodelist:
        master = first_host(nodelist)
    else:
        raise ConfigError(
            f"srun started this process on {nodes} nodes but no SLURM_*NODELIST says which: set MASTER_ADDR"
        )
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    else:
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", "") or env.get("SLURM_TASKS_PER_NODE", ""))
    local_size = int(per_node.group()) if per_node and nodes == 1 else None
    return LaunchedWorld("srun", rank, local, size, master, port, local_size)


def launched_world(env: Mapping[str, str] | None = None) -> LaunchedWorld:
    """The world this process's launcher says it belongs to (a plain process: a world of one)."""
    env = os.environ if env is None else env
    if "RANK" in env:  # the deepspeed launcher or torchrun: the variables torch reads are set already
        return LaunchedWorld(
            "deepspeed/torchrun",
            _int(env, "RANK"),
            _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1,
            env.get("MASTER_ADDR", "127.0.0.1"),
            _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_PORT,
            _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None,
        )
    if "OMPI_COMM_WORLD_RANK" in env:  # mpirun (also inside a SLURM allocation: it started the process)
        return _mpi(
            env,
            "OpenMPI's mpirun",
            tuple(f"OMPI_COMM_WORLD_{name}" for name in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE")),
            "pass it on, e.g. `mpirun -x MASTER_ADDR=<first node> -x MASTER_PORT=29500 ...` (under `deepspeed "
            "--launcher openmpi`, which does not pass on its --master_addr: a line MASTER_ADDR=<first node> in "
            "./.deepspeed_env)",
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH's and Intel MPI's hydra
        return _mpi(
            env,
            "MPICH's mpiexec",
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
            "pass it on, e.g. `mpiexec -genv MASTER_ADDR <first node> ...`",
        )
    if "SLURM_JOB_ID" in env:
        world = _slurm(env)
        if world is not None:
            return world
    # a plain process: port 0, the rendezvous store listens where the OS says (no other rank needs to
    # find it, and no other process can take the port between a probe and the bind)
    return LaunchedWorld(PLAIN, 0, 0, 1, "127.0.0.1", 0, 1)
