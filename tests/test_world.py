"""Every launcher's variables give one world (lilt_ds.world): the deepspeed launcher's and torchrun's as
they are, srun's and the MPI launchers' translated; a scheduler's N > 1 tasks that this process cannot
join is an error naming what was read. The real programs run in tests/test_cluster_runs.py."""

import pytest

from lilt_ds.errors import ConfigError
from lilt_ds.world import PLAIN, first_host, launched_world


def test_a_plain_process_is_a_world_of_one():
    world = launched_world({})
    assert (world.launcher, world.rank, world.world_size, world.master_addr) == (PLAIN, 0, 1, "127.0.0.1")
    assert world.environment()["RANK"] == "0"


def test_the_deepspeed_launchers_and_torchruns_variables_are_taken_as_they_are():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"}
    world = launched_world(env)
    assert (world.launcher, world.rank, world.local_rank, world.world_size) == ("deepspeed/torchrun", 3, 1, 4)
    assert (world.master_addr, world.master_port) == ("node0", 29600)


def srun_task(rank, tasks=2, nodes=1, **extra):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % (tasks // nodes)),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_NODELIST": "gpu-[007-008]" if nodes > 1 else "gpu-007",
        "SLURM_STEP_TASKS_PER_NODE": f"{tasks // nodes}(x{nodes})" if nodes > 1 else str(tasks),
    }
    return {**env, **extra}


def test_srun_tasks_form_one_world_with_rank_0_on_the_first_node():
    one_node = [launched_world(srun_task(rank)) for rank in range(2)]
    assert [(w.launcher, w.rank, w.local_rank, w.world_size) for w in one_node] == [
        ("srun", 0, 0, 2),
        ("srun", 1, 1, 2),
    ]
    assert {(w.master_addr, w.master_port, w.local_world_size) for w in one_node} == {("127.0.0.1", 15000 + 4242, 2)}
    two_nodes = launched_world(srun_task(3, tasks=4, nodes=2))
    assert (two_nodes.rank, two_nodes.local_rank, two_nodes.master_addr) == (3, 1, "gpu-007")
    assert launched_world(srun_task(0, MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")).master_port == 1234


def test_a_batch_script_with_several_tasks_but_no_srun_is_refused_naming_what_it_read():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8"}
    with pytest.raises(ConfigError, match=r"SLURM gave this job 8 tasks \(SLURM_JOB_ID=4242, SLURM_NTASKS=8\).*srun"):
        launched_world(env)
    assert launched_world({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1"}).world_size == 1  # one task: a plain run


def test_mpirun_ranks_form_one_world_and_several_nodes_need_master_addr():
    ompi = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "SLURM_JOB_ID": "5",
        "SLURM_NTASKS": "2",
    }  # mpirun inside SLURM
    world = launched_world(ompi)
    assert (world.launcher, world.rank, world.world_size, world.master_addr, world.master_port) == (
        "OpenMPI's mpirun",
        1,
        2,
        "127.0.0.1",
        29500,
    )
    with pytest.raises(
        ConfigError, match=r"several nodes \(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=4.*MASTER_ADDR"
    ):
        launched_world({**ompi, "OMPI_COMM_WORLD_SIZE": "4"})
    mpich = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    assert launched_world(mpich).launcher == "MPICH's mpiexec" and launched_world(mpich).world_size == 2


def test_the_first_host_of_a_slurm_hostlist():
    assert first_host("gpu-[003-005,007],cpu1") == "gpu-003"
    assert first_host("node17") == "node17"
    assert first_host("rack[1-2]-n[08-09]") == "rack1-n08"
