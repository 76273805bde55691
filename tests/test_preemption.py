"""A scheduler's stop signal to one rank of a real 2-rank run: every rank stops at the same step boundary
with a checkpoint and exit status 75, and the requeued command (``--resume auto``, the same as the first
start) repeats the uninterrupted run's losses and final trainable weights bit for bit."""

import os
import signal
import time

import psutil
import pytest
from safetensors.torch import load_file

from lilt_ds.preemption import PREEMPTED_EXIT_STATUS, StopRequest
from tests.test_checkpoint import launch_two_ranks, step_losses

SCHEDULE = ["train.max_steps=30", "checkpoint.every_steps=7", "train.epochs=20"]  # long enough to signal mid-run


def test_a_signal_raises_the_flag_once_and_the_handlers_are_restored():
    import torch

    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(["SIGUSR1", "SIGUSR2"], torch.device("cpu")).install()
    try:
        assert stop.flag.item() == 0 and stop.received is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.flag.item() == 1 and stop.received == "SIGUSR2"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def rank_process(launcher, rank: int) -> psutil.Process:
    """The training process of ``rank`` among the deepspeed launcher's descendants."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={rank}" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank}")


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_at_a_step_boundary_and_the_requeue_repeats_the_run(tmp_path, fp32_ds_configs):
    ds = fp32_ds_configs[2]
    reference = launch_two_ranks(tmp_path / "reference", ds, SCHEDULE)
    out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, out[-3000:]

    preempted = tmp_path / "preempted"
    first = launch_two_ranks(preempted, ds, SCHEDULE, extra_args=["--resume", "auto"])
    start = time.time()
    while not (preempted / "steps.jsonl").exists() or len(step_losses(preempted)) < 2:  # mid-epoch: 6 steps each
        assert first.poll() is None and time.time() - start < 300, first.stdout.read()[-3000:]
        time.sleep(0.05)
    rank_process(first, 1).send_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@... reaches the tasks so
    out = first.communicate(timeout=300)[0]
    assert first.returncode == PREEMPTED_EXIT_STATUS, out[-3000:]
    stopped_at = max(step_losses(preempted))
    assert 2 <= stopped_at < 30 and (preempted / "checkpoints" / f"step{stopped_at}").is_dir(), stopped_at
    # rank 0 writes the log; the signal went to rank 1
    assert f"stopped by a signal on another rank at step {stopped_at}" in (preempted / "train.log").read_text()
    assert "fresh" in out  # the same command found no checkpoint at the first start

    requeued = launch_two_ranks(preempted, ds, SCHEDULE, extra_args=["--resume", "auto"])
    out = requeued.communicate(timeout=600)[0]
    assert requeued.returncode == 0, out[-3000:]
    assert f"resumed from {preempted / 'checkpoints' / f'step{stopped_at}'}" in out

    expected, got = step_losses(tmp_path / "reference"), step_losses(preempted)
    assert sorted(got) == sorted(expected) == list(range(1, 31))
    for step, losses in got.items():
        assert all(loss == expected[step][0] for loss in losses), (step, losses, expected[step])
    weights = load_file(preempted / "trainable.safetensors")
    reference_weights = load_file(tmp_path / "reference" / "trainable.safetensors")
    assert weights.keys() == reference_weights.keys()
    assert all((weights[k] == reference_weights[k]).all() for k in weights)
