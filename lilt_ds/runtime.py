"""This process's place in a run: the process group and its device, seeds and RNG state, determinism,
and what the device runs natively.

Device calls go through DeepSpeed's accelerator, so the same code runs on a CPU (gloo) and on GPUs
(NCCL). The rule that matters on GPUs: a process makes ``cuda:LOCAL_RANK`` its current device
before the first collective. NCCL communicates on the current device (an object broadcast too), so
without it every rank would use ``cuda:0`` and ranks >= 1 fail at their first collective.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import ds_compat
from .errors import ConfigError
from .world import launched_world

log = logging.getLogger("lilt_ds")

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` that makes cuBLAS deterministic (CUDA's documented setting)."""


# ---------------------------------------------------------------------------------- device
def local_rank() -> int:
    """LOCAL_RANK as the launcher (deepspeed, torchrun) set it; 0 for a plain process."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise ConfigError(
            f"environment variable LOCAL_RANK={value!r} is not a rank: start the run with the "
            "deepspeed launcher, or unset LOCAL_RANK for a single process"
        )
    return rank


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def bind_device() -> torch.device:
    """Make this process's device (``cuda:LOCAL_RANK``, or the accelerator's equivalent) current; return it.

    On the CPU accelerator the call is a no-op, made all the same so that every device runs the
    same sequence of calls.
    """
    accel, rank = accelerator(), local_rank()
    if accel.device_name() == "cpu":
        accel.set_device(rank)
        return torch.device("cpu")
    count = accel.device_count()
    if rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={rank} but this machine has {count} {accel.device_name()} device(s): start at most "
            f"{count} process(es) per node (deepspeed --num_gpus {count}, or a hostfile with slots={count})"
        )
    accel.set_device(rank)
    return torch.device(accel.device_name(rank))


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- first-run builds
BUILD_SECONDS = {"deepspeed_shm_comm": 40, "cpu_adam": 80, "fused_adam": 80, "lilt_ds_fused_contrastive": 25}
"""About how long each JIT build took on the 2-core CPU machine (the README's figures), for the announcement."""


def announce(message: str) -> None:
    """A line for the user on rank 0: through the run's log once it is set up, else on stderr."""
    if os.environ.get("RANK", "0") != "0":
        return
    if log.handlers:
        log.info("%s", message)
    else:
        print(message, file=sys.stderr, flush=True)


def compiled(name: str) -> bool:
    """Whether torch's extension cache holds the compiled module ``name`` (a JIT build would then only load it)."""
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.isfile(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))


@contextlib.contextmanager
def announced_build(name: str, what: str):
    """Around a JIT build: a line before it (when nothing is cached yet: the first run in an
    environment) saying what is built and about how long it takes, and one after it."""
    if compiled(name):
        yield
        return
    seconds = BUILD_SECONDS.get(name)
    about = f", about {seconds} s on a 2-core CPU" if seconds else ""
    announce(
        f"building {what} ({name}; first run in this environment{about}; later runs load it from "
        "torch's extension cache)..."
    )
    started = time.perf_counter()
    yield
    announce(f"built {name} in {time.perf_counter() - started:.0f} s")


def announcing_jit_load(jit_load):
    """DeepSpeed's ``OpBuilder.jit_load`` wrapped in :func:`announced_build` (its builds are silent
    for a minute or two otherwise: a new user sees a frozen terminal)."""
    if getattr(jit_load, "announces", False):
        return jit_load

    def wrapped(builder, *args, **kwargs):
        with announced_build(builder.name, f"DeepSpeed's {builder.name} op"):
            return jit_load(builder, *args, **kwargs)

    wrapped.announces = True
    return wrapped


def announce_deepspeed_builds() -> None:
    from deepspeed.ops.op_builder.builder import OpBuilder

    OpBuilder.jit_load = announcing_jit_load(OpBuilder.jit_load)


class World(NamedTuple):
    rank: int
    world_size: int
    device: torch.device


def init_distributed(timeout_s: float | None = None) -> World:
    """Bind this process's device, then join the launcher's process group (a plain run: a world of one).

    The one place every entry point (training, evaluation, memory measurement, benchmarks) joins
    the group, so the device is bound before any collective. Calling it again is harmless. The world
    is the launcher's: the deepspeed launcher's or torchrun's variables, or those of srun and the MPI
    launchers translated (:mod:`lilt_ds.world`). ``timeout_s``: how long a collective may wait for
    the other ranks before it fails (``train.collective_timeout_s``; None: torch's default).
    """
    import deepspeed

    global _joined_a_group
    if not torch.distributed.is_initialized():
        world = launched_world()
        if world.launcher != "deepspeed/torchrun":
            os.environ.update(world.environment())
        _joined_a_group = True
    device = bind_device()
    announce_deepspeed_builds()  # the CPU accelerator JIT-builds its shared-memory collectives here
    if timeout_s is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)


_joined_a_group = False  # set once this process has joined a process group (init_distributed)


def end_process(code) -> None:
    """End a command that joined a process group with ``sys.exit(code)``'s status, skipping finalization.

    The atexit handlers run (logging, multiprocessing's workers, trackers), then the process exits
    without Python's finalization: there, a C++ thread of torch.distributed that asks for the GIL is
    stopped inside a destructor and aborts the process ("terminate called without an active
    exception", status -6) after the run had finished and saved everything; a scheduler would mark
    the job failed. A process that never joined a group returns and exits normally.
    """
    if not _joined_a_group:
        return
    if isinstance(code, str):  # sys.exit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
    status = 1 if isinstance(code, str) else int(code or 0)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextlib.contextmanager
def process_group_scope():
    """Destroy, once the block succeeds, the process group it created (through init_distributed), and
    remove the shared-memory file DeepSpeed's CPU accelerator made for it (it would stay in RAM).

    Left to interpreter exit, gloo's worker threads can still hold DeepSpeed's async work and abort
    the process ("terminate called without an active exception") after the work finished. A group
    that existed before the block stays, and so does any group after an error (other ranks may
    still be in a collective, where destroying would hang, or still opening this rank's file).
    """
    existed = torch.distributed.is_initialized()
    yield
    if not existed and torch.distributed.is_initialized():
        import deepspeed.comm

        shm_file = ds_compat.shm_allreduce_file(torch.distributed.get_rank())
        deepspeed.comm.destroy_process_group()
        if shm_file is not None:  # every rank opened it at init; the mappings outlive the name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm_file)


@dataclass(frozen=True)
class DeviceFacts:
    """What a device runs well: its type and whether it computes bf16 natively (and why we think so)."""

    type: str  # cuda | cpu | another accelerator's name
    name: str
    native_bf16: bool
    reason: str

    @property
    def is_gpu(self) -> bool:
        return self.type != "cpu"


GPU_TARGET = DeviceFacts(
    "cuda",
    "a GPU of compute capability 8.0 or newer",
    True,
    "the estimate assumes a GPU of compute capability 8.0 or newer (A100, H100, L4, ...)",
)
"""What the memory estimator plans for when the ds_config leaves a device choice on "auto"."""

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX, Arm's BF16 extension


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def present_device() -> DeviceFacts:
    """The facts of the device this process trains on (its accelerator; bound by init_distributed)."""
    accel = accelerator()
    kind = accel.device_name()
    if kind == "cuda":
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        native = major >= 8
        return DeviceFacts(
            "cuda",
            name,
            native,
            f"{name} has compute capability {major}.{minor} "
            + ("(8.0+ runs bf16 natively)" if native else "(bf16 needs 8.0+; fp32 instead)"),
        )
    if kind == "cpu":
        found = sorted(set(_CPU_BF16_FLAGS) & cpu_flags())
        reason = (
            f"this CPU has {', '.join(found)}"
            if found
            else "this CPU has no AVX512-BF16, AMX or Arm BF16 instructions: bf16 would be emulated, fp32 is faster"
        )
        return DeviceFacts("cpu", "cpu", bool(found), reason)
    return DeviceFacts(kind, kind, bool(accel.is_bf16_supported()), f"the {kind} accelerator reports its bf16 support")


# ---------------------------------------------------------------------------------- seeds and RNG state
def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every accelerator generator): for the start of a process only."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_device() -> torch.device | None:
    """The accelerator device whose generator this process draws from (its bound device), if any."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def torch_rng_state(device: torch.device | None = None) -> tuple:
    """torch's CPU generator and ONE device's generator: ``device`` (a CPU device: none), by default
    the bound one. Dropout draws from the device of its tensors; other visible GPUs are not ours."""
    if device is None:
        device = rng_device()
    elif device.type != "cuda":
        device = None
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return torch.get_rng_state(), device, (torch.cuda.get_rng_state(device) if device is not None else None)


def set_torch_rng_state(state: tuple) -> None:
    cpu, device, device_state = state
    torch.set_rng_state(cpu)
    if device is not None:
        torch.cuda.set_rng_state(device_state, device)


@contextlib.contextmanager
def replay_torch_rng(state: tuple):
    """Run the block from ``state`` and leave the generators as they were before it."""
    _, device, _ = state
    with torch.random.fork_rng(devices=[device] if device is not None else []):
        set_torch_rng_state(state)
        yield


def rng_state() -> dict:
    """Every generator a training process draws from: Python, NumPy, torch's CPU and its bound device's."""
    cpu, device, device_state = torch_rng_state()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": cpu}
    if device is not None:
        state["cuda"] = device_state
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; the device generator goes to this process's bound device, which need
    not have the index of the device that saved it (another machine, fewer visible GPUs)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


# ---------------------------------------------------------------------------------- determinism
def set_deterministic(enabled: bool) -> None:
    """torch's deterministic algorithms and deterministic cuDNN/cuBLAS (``train.deterministic``).

    Operations without a deterministic implementation warn (once each) rather than stop the run.
    ``CUBLAS_WORKSPACE_CONFIG`` must be set before the first cuBLAS call: call this before the model
    reaches the device.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
