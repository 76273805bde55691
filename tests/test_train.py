"""The main command end to end through real launchers: several processes, two nodes, resume, bad input."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import tiny_training_overrides
from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def pretrain_args(output_dir, ds_config="zero2.json", extra=()):
    return [
        "launch/pretrain.py",
        "--deepspeed_config",
        os.path.join("ds_configs", ds_config),
        "--output_dir",
        str(output_dir),
        "--overrides",
        *tiny_training_overrides(output_dir, extra),
    ]


def run(cmd, timeout=600, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1") if env is None else env
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_deepspeed_launcher_two_processes_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    result = run(
        [
            DEEPSPEED,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            *pretrain_args(out, extra=["train.max_steps=3", "train.epochs=1"]),
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trainable weights identical on all 2 rank(s)" in result.stdout
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["vision"]["name"] == "tiny" and resolved["train"]["max_steps"] == 3
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 * 2 and ds["zero_optimization"]["stage"] == 2
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert records and {"step", "epoch", "txt_r1", "img_r10", "r_mean"} <= set(records[-1])
    assert records[-1]["step"] == 3
    assert "step 1 samples_seen 8 loss=" in (out / "train.log").read_text()  # 4 per rank x 2 ranks
    assert "| image->text |" in result.stdout


@pytest.mark.slow
def test_lit_on_the_feature_cache_through_the_launcher_two_ranks_with_workers(tmp_path):
    """Two ranks build one cache (each its blocks, DataLoader workers decoding), then train on it:
    workers read the rows from the shared mapping; a second run finds it complete."""
    import numpy as np

    lit = [
        "mode=lit",
        "model.vision.unlock=[]",
        "model.text.unlock=[]",
        "data.cache_locked_features=true",
        "data.num_workers=1",
        "train.max_steps=3",
        "train.epochs=1",
        "eval.batch_size=4",
    ]

    def launch(name):
        args = pretrain_args(tmp_path / name, extra=lit)
        result = run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return (tmp_path / name / "train.log").read_text()

    first = launch("first")
    built = re.search(r"feature cache (\S+): (\d+) of its 48 rows built here", first)
    assert built and 0 < int(built.group(2)) < 48, first[-2000:]  # rank 0's share; rank 1 built the rest
    assert np.all(np.fromfile(os.path.join(built.group(1), "status.u8"), np.uint8) == 1)
    assert re.search(r"step 3 samples_seen \d+ loss=", first)
    second = launch("second")
    assert f"feature cache {built.group(1)}: complete, 1 views x 48 images" in second


@pytest.mark.slow
def test_train_destroys_only_the_process_group_it_created(tmp_path):
    """A finished run must not leave gloo's threads to interpreter exit (a rank then aborts after
    training); a group the caller made is the caller's. A second run in the same process still works."""
    script = f"""
import torch.distributed as dist
from lilt_ds.config import load_config
from lilt_ds.train import train
from tests.conftest import tiny_training_overrides
from tests.distributed import free_port

def run(name):
    cfg = load_config("demo", tiny_training_overrides({str(tmp_path)!r}, ["train.max_steps=1",
                                                                     "output_dir=" + {str(tmp_path)!r} + "/" + name]))
    train(cfg, "ds_configs/zero2.json")

run("own")
print("own group left:", dist.is_initialized())
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{free_port()}}", rank=0, world_size=1)
run("callers")
print("caller's group left:", dist.is_initialized())
"""
    result = run([sys.executable, "-c", script])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "own group left: False" in result.stdout
    assert "caller's group left: True" in result.stdout
    assert (tmp_path / "callers" / "trainable.safetensors").exists()


@pytest.mark.slow
def test_two_nodes_on_localhost_train_together(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, out = str(free_port()), tmp_path / "run"
    procs = [
        subprocess.Popen(
            [
                DEEPSPEED,
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                *pretrain_args(out, extra=["train.max_steps=2"]),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "trainable weights identical on all 2 rank(s)" in outputs[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    contradicting = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    contradicting["train_micro_batch_size_per_gpu"] = 64
    (tmp / "contradicting.json").write_text(json.dumps(contradicting))
    stage5 = dict(contradicting, train_micro_batch_size_per_gpu="auto", zero_optimization={"stage": 5})
    (tmp / "stage5.json").write_text(json.dumps(stage5))
    (tmp / "a_file").write_text("not a folder")
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,message",
    [
        (
            "contradicting",
            r"sets train_micro_batch_size_per_gpu=64 but the experiment config gives train\.micro_batch_size=4",
        ),
        ("stage5", "unknown ZeRO stage 5"),
        ("missing_data", "missing.json"),
        ("unwritable", "is not writable"),
        ("missing_ds_config", "does not exist: pick one of ds_configs"),
    ],
)
def test_bad_input_stops_before_training_with_a_clear_message(bad_inputs, case, message):
    out, ds, extra = bad_inputs / f"out-{case}", "zero2.json", []
    if case in ("contradicting", "stage5"):
        ds = str(bad_inputs / f"{case}.json")
    elif case == "missing_data":
        extra = [f"data.train_files=[{bad_inputs / 'missing.json'}]"]
    elif case == "unwritable":
        out = bad_inputs / "a_file" / "run"
    elif case == "missing_ds_config":
        ds = str(bad_inputs / "nope.json")
    args = pretrain_args(out, extra=extra)
    args[2] = ds if os.path.isabs(ds) else args[2]
    result = run([sys.executable, *args], timeout=300)
    assert result.returncode != 0
    assert "error:" in result.stderr and re.search(message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "training " not in result.stdout  # stopped before the loop


def test_hostfile_check_names_the_line_and_the_fix(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nworker-1 slots=4\nworker-2 4\n")
    result = run([sys.executable, "launch/check_hostfile.py", str(hostfile)])
    assert result.returncode != 0 and "line 3" in result.stderr and "'hostname slots=N'" in result.stderr
    hostfile.write_text("worker-1 slots=4\nworker-1 slots=4\n")
    assert "listed twice" in run([sys.executable, "launch/check_hostfile.py", str(hostfile)]).stderr
    ok = run([sys.executable, "launch/check_hostfile.py", os.path.join(ROOT, "launch", "hostfile.example")])
    assert ok.returncode == 0 and "2 node(s), 8 process(es)" in ok.stdout
    script = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "pretrain_lilt.sh"), "train.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HOSTFILE=str(hostfile), PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"]),
    )
    assert script.returncode != 0 and "listed twice" in script.stderr


@pytest.mark.slow
def test_non_finite_losses_skip_steps_then_abort(tmp_path):
    out = tmp_path / "run"
    result = run(
        [
            sys.executable,
            *pretrain_args(
                out, extra=["train.lr=1e30", "train.grad_clip=0", "train.max_steps=10", "train.max_nonfinite_steps=2"]
            ),
        ]
    )
    assert result.returncode != 0
    assert "step skipped (1 in a row, 1 in total)" in result.stdout
    assert "error: 2 non-finite losses in a row" in result.stderr and "Traceback" not in result.stderr


# -------------------------------------------------------------------------------- host syncs per step
class HostSyncCounter:
    """Counts the host syncs lilt_ds's own code makes (a tensor's value read on the host: item(), float(),
    bool(), tolist()); on a GPU each one waits for the device. DeepSpeed's own are not ours to count."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        import lilt_ds

        self.count, self.package = 0, os.path.dirname(lilt_ds.__file__)
        self.torch_dir, counter = os.path.dirname(torch.__file__), self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.note()
                return func(*args, **(kwargs or {}))

        self.mode, self.tolist = Mode(), torch.Tensor.tolist

    def note(self):
        frame = sys._getframe(2)
        while frame is not None and (
            frame.f_code.co_filename.startswith(self.torch_dir) or frame.f_code.co_filename == __file__
        ):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(self.package):
            self.count += 1

    def __enter__(self):
        import torch

        counter, tolist = self, self.tolist

        def counted_tolist(tensor):
            counter.note()
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self.tolist


@contextlib.contextmanager
def _lilt_ds_logging_restored():
    """An in-process Trainer sets up the run's logging (no propagation to the root logger): undo it."""
    import logging

    log = logging.getLogger("lilt_ds")
    before = (list(log.handlers), log.propagate, log.level)
    try:
        yield
    finally:
        for handler in log.handlers:
            if handler not in before[0]:
                handler.close()
        log.handlers[:], log.propagate = before[0], before[1]
        log.setLevel(before[2])


def test_one_host_sync_per_optimizer_step_and_non_finite_steps_are_caught(tmp_path):
    """The loss value, read once per step before the backward or update it guards, is the only host
    sync lilt_ds makes (no size exchange, no per-micro-batch check): with and without accumulation."""
    import itertools

    import torch

    from lilt_ds.config import load_config
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.schema import replace_keys
    from lilt_ds.train import NonFiniteLossError, Trainer

    def trainer(name, accum):
        cfg = load_config(
            "demo",
            tiny_training_overrides(
                tmp_path,
                [
                    "train.max_steps=20",
                    "train.log_every=1000",
                    f"train.grad_accum_steps={accum}",
                    "eval.every_epochs=0",
                    f"output_dir={tmp_path / name}",
                ],
            ),
        )
        t = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"))
        t.batches = [t.to_device(b) for b in itertools.islice(iter(t.loader), 4)]
        t.optimizer_step(t.batches[:accum])  # step 1 logs its metrics (host reads of its own)
        return t

    def syncs_per_step(t, micro_batches, steps=2):
        with HostSyncCounter() as counter:
            for _ in range(steps):
                assert torch.isfinite(torch.tensor(t.optimizer_step(micro_batches)))
        return counter.count / steps

    with process_group_scope(), _lilt_ds_logging_restored():
        single = trainer("single", 1)
        assert syncs_per_step(single, single.batches[:1]) == 1
        nan_batch = dict(single.batches[1], images=torch.full_like(single.batches[1]["images"], float("nan")))
        assert single.optimizer_step([nan_batch]) != single.optimizer_step([nan_batch])  # NaN: skipped twice
        assert (single.nonfinite_total, single.step) == (2, 3)
        single.engine.destroy()

        accumulating = trainer("accumulating", 2)
        assert syncs_per_step(accumulating, accumulating.batches[:2]) == 1
        accumulating.cfg = replace_keys(accumulating.cfg, {"train.exact_accumulation": True})
        assert syncs_per_step(accumulating, accumulating.batches[:2]) == 1
        assert accumulating.optimizer_step([nan_batch, accumulating.batches[0]]) != 0  # exact: skipped
        assert accumulating.nonfinite_total == 1
        accumulating.cfg = replace_keys(accumulating.cfg, {"train.exact_accumulation": False})
        with pytest.raises(
            NonFiniteLossError,
            match=r"non-finite loss \(nan\) in step 6 \(non-finite values \(NaN or "
            r"inf\) in image_emb\).*cannot be skipped",
        ):
            accumulating.optimizer_step([nan_batch, accumulating.batches[0]])
        accumulating.engine.destroy()


def _rank_that_fails(rank, port, out_dir, how, timeout):
    """One of two gloo ranks of a real training run; at step 2, rank 1 dies (SIGKILL) or hangs. Rank 0
    writes what ended its run and how long after its step 2."""
    import signal as signals

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    from lilt_ds.config import load_config
    from lilt_ds.train import Trainer

    cfg = load_config(
        "demo",
        tiny_training_overrides(
            out_dir,
            [
                "train.max_steps=40",
                "train.epochs=20",
                "eval.every_epochs=0",
                f"train.collective_timeout_s={timeout}",
                f"output_dir={out_dir}/run",
            ],
        ),
    )
    trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"), quiet=True)
    original, reached = trainer.optimizer_step, []

    def step(batches):
        if trainer.step == 2:
            reached.append(time.perf_counter())
            if rank == 1:
                if how == "killed":
                    os.kill(os.getpid(), signals.SIGKILL)
                time.sleep(60 * timeout)  # hung: a stuck file system, a dead node that answers nothing
        return original(batches)

    trainer.optimizer_step = step
    try:
        trainer.run()
        outcome = {"error": None}
    except Exception as e:  # noqa: BLE001 - what ended the run is the result
        outcome = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - reached[0]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    os._exit(0)  # no teardown of a group whose other rank is gone


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_others_within_the_collective_timeout(tmp_path, how):
    import torch.multiprocessing as mp

    timeout = 15
    context = mp.start_processes(
        _rank_that_fails, args=(free_port(), str(tmp_path), how, timeout), nprocs=2, join=False, start_method="spawn"
    )
    rank0, rank1 = context.processes
    rank0.join(timeout=300)
    alive = rank0.is_alive()
    for process in (rank0, rank1):
        if process.is_alive():
            process.kill()
    assert not alive, "rank 0 still waits for the other rank"
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] is not None and outcome["error"].startswith("CollectiveFailed: rank 0: a collective failed")
    assert f"train.collective_timeout_s={timeout} s" in outcome["error"] and "--resume auto" in outcome["error"]
    assert outcome["seconds"] < timeout + 30, outcome  # within the timeout (plus the start of a step)


@pytest.mark.slow
def test_a_resampled_stream_trains_evaluating_by_steps_and_logs_the_samples_seen(tmp_path):
    """data.resampled on real shards: an epoch is data.samples_per_epoch samples, evaluations come every
    eval.every_steps steps (and at the end), and steps.jsonl counts the samples seen."""
    from lilt_ds.config import load_config
    from lilt_ds.runtime import process_group_scope
    from lilt_ds.train import Trainer
    from tests.data.files import write_image, write_json
    from tests.data.shards.test_stream import make_source

    pattern = make_source(tmp_path / "shards", 0, 4, 6)
    held_out = [
        {"image": write_image(tmp_path / f"eval{k}.jpg", (60 * k, 90, 30)), "caption": [f"eval {k}"]} for k in range(4)
    ]
    extra = [f"data.train_shards={pattern}", "data.resampled=true", "data.samples_per_epoch=16", "eval.every_steps=2"]
    extra += [
        "eval.every_epochs=0",
        "train.max_steps=5",
        f"data.eval_file={write_json(tmp_path / 'eval.json', held_out)}",
    ]
    cfg = load_config("demo", tiny_training_overrides(tmp_path, [*extra, f"output_dir={tmp_path / 'run'}"]))
    with process_group_scope(), _lilt_ds_logging_restored():
        trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"), quiet=True)
        assert trainer.steps_per_epoch == 4  # 16 samples / batch 4
        trainer.run()
        trainer.engine.destroy()
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5] and all("txt_r1" in r for r in records)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["samples_seen"]) for s in steps] == [(k, 4 * k) for k in range(1, 6)]
