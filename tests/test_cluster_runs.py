"""The trainer under the real cluster programs: srun, an sbatch of launch/pretrain.sbatch (the README's batch
script), OpenMPI's mpirun, torchrun and the deepspeed launcher's slurm and openmpi back ends each form one world
of 2 ranks (lilt_ds.world translates what they set); a batch job of 2 tasks that starts python without srun stops
with the variables it read. tests/cluster.py starts the programs (a one-node SLURM on 127.0.0.1; mpirun and
torchrun in a network namespace with only a loopback device) and skips, saying why, where they are missing."""

import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from lilt_ds.preemption import PREEMPTED_EXIT_STATUS
from tests.cluster import (
    loopback_netns_prefix,
    mpirun_command,
    run_command,
    slurm_cluster_fixture,  # noqa: F401 (the slurm_cluster fixture)
    torchrun_command,
    which_or_skip,
)
from tests.conftest import tiny_training_overrides
from tests.test_checkpoint import step_losses
from tests.test_train import DEEPSPEED, ROOT, pretrain_args

pytestmark = pytest.mark.slow
BATCH_SCRIPT = Path(ROOT) / "launch" / "pretrain.sbatch"
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def job_env(base=None, **extra):
    """``base`` (default os.environ) with this venv's programs first and no launcher variables of the test's own."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in LAUNCHER_VARIABLES}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def assert_one_world_of_two(result, out):
    """Two ranks trained together: rank 0 saw 2 ranks, the global batch counts both, one run folder."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "trainable weights identical on all 2 rank(s)" in output, output[-4000:]
    log = (out / "train.log").read_text()
    assert re.search(r"training 2 steps \(\d+ per epoch\), 2 rank\(s\)", log), log[-2000:]
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 4 * 2
    assert [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()] == [1, 2]


def train_command(out):
    return [sys.executable, *pretrain_args(out, extra=["eval.every_epochs=0"])]


# ------------------------------------------------------------------------------------------------ SLURM
def test_srun_tasks_train_as_one_world(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    srun = ["srun", "-n", "2", "-p", slurm_cluster.partition, "--kill-on-bad-exit=1"]
    result = run_command([*srun, *train_command(out)], env=job_env(slurm_cluster.env), cwd=ROOT, timeout=300)
    assert_one_world_of_two(result, out)
    assert "2 rank(s) started by srun" in (out / "train.log").read_text()


def test_python_without_srun_in_a_job_of_two_tasks_stops_naming_the_variables(slurm_cluster, tmp_path):
    """The batch step itself has SLURM_NTASKS=2 and no SLURM_STEP_NUM_TASKS: a process there would train alone."""
    log = tmp_path / "job.out"
    command = shlex.join(train_command(tmp_path / "run"))
    sbatch = ["sbatch", "--wait", "-n", "2", "-p", slurm_cluster.partition, "-o", str(log), "--wrap", command]
    result = run_command(sbatch, env=job_env(slurm_cluster.env), cwd=ROOT, timeout=120)
    output = log.read_text()
    assert result.returncode == 1, result.stdout + result.stderr + output
    assert "SLURM gave this job 2 tasks (SLURM_JOB_ID=" in output and "SLURM_NTASKS=2" in output, output
    assert "start it with `srun" in output and "Traceback" not in output, output
    assert not (tmp_path / "run" / "steps.jsonl").exists()


def slurm_job(cluster, job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields ({} once the job has left the controller)."""
    shown = run_command(["scontrol", "-o", "show", "job", job_id], env=cluster.env, timeout=15)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout)) if shown.returncode == 0 else {}


def test_the_batch_script_stops_on_usr1_requeues_itself_and_resumes(slurm_cluster, tmp_path):
    """launch/pretrain.sbatch as a user submits it (its GPU and CPU counts overridden for this node): SIGUSR1 to
    the job's tasks (what --signal=USR1@180 sends) stops both ranks at one step with a checkpoint and status 75;
    the script requeues the job; the same command resumes it (--resume auto) and finishes the run."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    sizes = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}"]
    overrides = tiny_training_overrides(out, ["train.max_steps=30", "checkpoint.every_steps=7", "train.epochs=20"])
    submit = ["sbatch", "--parsable", "-p", slurm_cluster.partition, *sizes, str(BATCH_SCRIPT), "--overrides"]
    env = job_env(slurm_cluster.env, OUTPUT_DIR=str(out))
    job_id = run_command([*submit, *overrides], env=env, cwd=ROOT, timeout=30, check=True).stdout.strip()

    deadline = time.monotonic() + 300
    while not (out / "steps.jsonl").exists() or len(step_losses(out)) < 2:  # mid-run
        assert slurm_job(slurm_cluster, job_id).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    run_command(["scancel", "--signal=USR1", job_id], env=slurm_cluster.env, timeout=15, check=True)

    while (job := slurm_job(slurm_cluster, job_id)).get("Restarts", "0") == "0" or job.get("JobState") != "PENDING":
        assert job.get("JobState") in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"), (job, log.read_text()[-3000:])
        assert time.monotonic() < deadline, (job, log.read_text()[-3000:])
        time.sleep(0.2)
    requeued_at = time.time()
    while slurm_cluster.node_state() != "idle":  # the first start's clean-up done (else the restart can fail)
        assert time.monotonic() < deadline, (slurm_cluster.node_state(), log.read_text()[-3000:])
        time.sleep(0.2)
    # a requeued job waits two minutes (SLURM's requeue delay: Reason=BeginTime) to start again; skip the wait, but
    # not into the second of the requeue: slurmd refuses a launch credential made in the second its job was killed
    # ("already killed, do not launch batch job": revocation times are whole seconds)
    time.sleep(max(0.0, math.floor(requeued_at) + 2 - time.time()))
    run_command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_cluster.env, check=True)
    states = []  # the requeued job's states, for a failure's message
    while (state := slurm_job(slurm_cluster, job_id).get("JobState")) not in ("COMPLETED", "FAILED", "CANCELLED"):
        if state is None and "RUNNING" in states:  # it ran and has left the controller (MinJobAge)
            break
        states.append(state)
        assert time.monotonic() < deadline + 300, (states, log.read_text()[-3000:], slurm_cluster.logs())
        time.sleep(0.2)
    states.append(state)

    text = log.read_text()
    first = re.search(r"stopped by SIGUSR1 at step (\d+)", text)
    assert first and f"exit code {PREEMPTED_EXIT_STATUS}" in text, text[-4000:]
    stopped_at = int(first.group(1))
    assert 2 <= stopped_at < 30 and (out / "checkpoints" / f"step{stopped_at}").is_dir(), text[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step{stopped_at}'}" in text, (
        states,
        text[-4000:],
        slurm_cluster.logs(),
    )
    assert sorted(step_losses(out)) == list(range(1, 31))
    assert "trainable weights identical on all 2 rank(s)" in text and "Traceback" not in text, text[-4000:]
    assert slurm_job(slurm_cluster, job_id).get("JobState") in (None, "COMPLETED"), text[-4000:]


def test_the_deepspeed_launchers_slurm_back_end_forms_one_world(slurm_cluster, tmp_path):
    """``deepspeed --launcher slurm`` runs ``srun -n 2 python -u ...`` (no --local_rank argument, no RANK)."""
    out, hostfile = tmp_path / "run", tmp_path / "hostfile"
    hostfile.write_text(f"{slurm_cluster.node} slots=2\n")
    launcher = [DEEPSPEED, "--hostfile", str(hostfile), "--force_multi", "--no_ssh_check", "--launcher", "slurm"]
    launcher += ["--launcher_args", f"-p {slurm_cluster.partition}", "--master_addr", "127.0.0.1"]
    result = run_command([*launcher, *pretrain_args(out)], env=job_env(slurm_cluster.env), cwd=ROOT, timeout=300)
    assert_one_world_of_two(result, out)
    assert "2 rank(s) started by srun" in (out / "train.log").read_text()


# -------------------------------------------------------------------------------------- MPI and torchrun
def test_mpirun_ranks_train_as_one_world(tmp_path):
    out = tmp_path / "run"
    result = run_command([*mpirun_command(2), *train_command(out)], env=job_env(), cwd=ROOT, timeout=300)
    assert_one_world_of_two(result, out)
    assert "2 rank(s) started by OpenMPI's mpirun" in (out / "train.log").read_text()


def test_the_deepspeed_launchers_openmpi_back_end_forms_one_world(tmp_path):
    """``deepspeed --launcher openmpi`` runs ``mpirun -n 2 -hostfile ... python -u ...``, here on loopback."""
    which_or_skip("mpirun", "openmpi-bin")
    out, hostfile = tmp_path / "run", tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    mpi_args = "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"
    launcher = [DEEPSPEED, "--hostfile", str(hostfile), "--force_multi", "--no_ssh_check", "--launcher", "openmpi"]
    launcher += ["--launcher_args", mpi_args, "--master_addr", "127.0.0.1"]
    result = run_command(
        [*loopback_netns_prefix(), *launcher, *pretrain_args(out)], env=job_env(), cwd=ROOT, timeout=300
    )
    assert_one_world_of_two(result, out)
    assert "2 rank(s) started by OpenMPI's mpirun" in (out / "train.log").read_text()


def test_torchrun_ranks_train_as_one_world(tmp_path):
    out = tmp_path / "run"
    result = run_command([*torchrun_command(2), *train_command(out)[1:]], env=job_env(), cwd=ROOT, timeout=300)
    assert_one_world_of_two(result, out)
    assert "2 rank(s) started by deepspeed/torchrun" in (out / "train.log").read_text()
