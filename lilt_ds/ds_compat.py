"""Every use of DeepSpeed's private attributes, in one place, for the layouts of the versions tested.

DeepSpeed has no public API for a few things lilt_ds needs: the fp32 master fragment of one
parameter under ZeRO-0/1/2 (to clamp the temperature there), turning off ZeRO-0's self-all-reduce on
one rank, torch's own ``F.linear`` after a ZeRO-3 engine replaced it, the ZeRO-3 attributes of a
parameter, the step count of CPU Adam's C++ optimizer (for an exact resume), and the shared-memory
file of the CPU accelerator's all-reduce (DeepSpeed never removes it). Each function here
knows the layouts of the tested versions (``TESTED``, pinned in setup.py) and raises
:class:`UnknownLayout` on anything else, so a renamed attribute stops a run with a message instead
of silently changing what it does. ``PRIVATE`` lists every attribute used; a test checks them
against the installed DeepSpeed.
"""

from __future__ import annotations

import os

import torch

TESTED = ">=0.19.3,<0.20"
"""DeepSpeed versions these layouts were checked with (setup.py pins the same range)."""

PRIVATE = {
    "deepspeed.runtime.engine:DeepSpeedEngine": ("enable_backward_allreduce",),
    "deepspeed.runtime.zero.partition_parameters:InsertPostInitMethodToModuleSubClasses": ("linear_bk",),
    "deepspeed.runtime.zero.partition_parameters:zero3_linear_wrap": (),
    "deepspeed.runtime.fp16.fused_optimizer:FP16_Optimizer": ("fp16_groups", "fp32_groups_flat"),
    "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer": ("_hp_mapping",),
    "ZeRO-3 parameter": ("ds_id", "ds_numel", "ds_tensor", "ds_persist"),
    "an engine's optimizer wrapper (ZeRO, FP16/BF16)": ("optimizer",),
    "deepspeed.ops.adam.cpu_adam:DeepSpeedCPUAdam": ("ds_opt_adam", "opt_id"),
    "deepspeed.ops.adam.fused_adam:FusedAdam": ("multi_tensor_adam", "_dummy_overflow_buf", "adam_w_mode"),
    "deepspeed.comm.torch:TorchBackend": ("shm_comm_op",),
}
"""Owner -> the private attributes lilt_ds reads or writes on it (on an engine, an optimizer of that
class, a parameter it manages, or the class itself)."""


class UnknownLayout(RuntimeError):
    """DeepSpeed's internals are not laid out as in the tested versions."""

    def __init__(self, what: str):
        import deepspeed

        super().__init__(
            f"{what}: DeepSpeed {deepspeed.__version__} is not laid out as the versions lilt_ds was "
            f"tested with ({TESTED}); install one of those (pip install 'deepspeed{TESTED}')"
        )


# ---------------------------------------------------------------------------------- ZeRO-3 parameters
def is_zero3(param: torch.Tensor) -> bool:
    """A parameter that a ZeRO-3 engine partitions (gather it before reading or writing it)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also while ZeRO-3 holds only this rank's partition."""
    return param.ds_numel if is_zero3(param) else param.numel()


def zero3_partition(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's ZeRO-3 partition of ``param`` (None for a parameter ZeRO-3 does not manage)."""
    if not is_zero3(param):
        return None
    if not hasattr(param, "ds_tensor"):
        raise UnknownLayout("a ZeRO-3 parameter without ds_tensor")
    return param.ds_tensor


def is_persistent(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter kept whole on every rank (below the persistence threshold)."""
    return bool(getattr(param, "ds_persist", False))


# ---------------------------------------------------------------------------------- the engine
def disable_backward_allreduce(engine) -> None:
    """Stop the engine's gradient all-reduce after backward (ZeRO-0 on one rank: nothing to average)."""
    if not hasattr(engine, "enable_backward_allreduce"):
        raise UnknownLayout("DeepSpeedEngine has no enable_backward_allreduce")
    engine.enable_backward_allreduce = False


def torch_linear_function():
    """torch.nn.functional.linear as torch defines it, also after a ZeRO-3 engine in this process
    replaced it (``zero_optimization.memory_efficient_linear``) for the rest of the process."""
    from deepspeed.runtime.zero import partition_parameters as zero3

    saved = getattr(zero3.InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if saved is not None:
        return saved
    if torch.nn.functional.linear is getattr(zero3, "zero3_linear_wrap", None):
        raise UnknownLayout("F.linear is ZeRO-3's but DeepSpeed kept no linear_bk")
    return torch.nn.functional.linear


def local_fp32_master(engine, param: torch.Tensor) -> torch.Tensor | None:
    """This rank's part of the fp32 master copy of ``param``, as a view to change in place.

    None only where that is the answer: the engine keeps no master apart from the parameter (fp32
    without ZeRO), or this rank owns none of it. ZeRO-1/2 (DeepSpeedZeroOptimizer): the fragment
    this rank owns (``safe_get_full_fp32_param`` would all-reduce it into the whole
    tensor). ZeRO-0 with fp16/bf16 (FP16_Optimizer, which ``safe_get_full_fp32_param`` does not
    know): the parameter's slice of its group's flat fp32 master. Not for ZeRO-3: use DeepSpeed's
    public ``safe_get/set_local_fp32_param``.
    """
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if is_zero3(param):
        raise ValueError("local_fp32_master: a ZeRO-3 parameter (use deepspeed.utils.safe_get_local_fp32_param)")
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        if not hasattr(param, "_hp_mapping"):
            raise UnknownLayout(f"{type(optimizer).__name__} linked no _hp_mapping to a trainable parameter")
        return None if param._hp_mapping is None else param._hp_mapping.get_hp_fragment()
    if isinstance(optimizer, FP16_Optimizer):
        groups, flats = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups_flat", None)
        if groups is None or flats is None:
            raise UnknownLayout("FP16_Optimizer without fp16_groups / fp32_groups_flat")
        for group, flat in zip(groups, flats):
            offset = 0
            for p in group:
                if p is param:
                    return flat.narrow(0, offset, p.numel())
                offset += p.numel()
        raise UnknownLayout("a trainable parameter in none of FP16_Optimizer's fp16_groups")
    if isinstance(optimizer, torch.optim.Optimizer) and engine_keeps_no_master(engine):
        return None  # fp32 without ZeRO: the parameter is the master
    raise UnknownLayout(f"an engine whose optimizer is a {type(optimizer).__name__}")


def engine_keeps_no_master(engine) -> bool:
    """fp32 without ZeRO: DeepSpeed steps the module's own parameters (public engine calls only)."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


# ---------------------------------------------------------------------------------- CPU Adam after a load
ADAM_CHUNK = 2048 * 32
"""The chunk size DeepSpeed's FusedAdam passes its multi-tensor op (unused by the CPU op)."""


def _stepping_optimizer(optimizer):
    """The optimizer that steps, inside an engine's ZeRO / BF16 / FP16 wrappers (each holds it as .optimizer)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def _cpu_adam_update(optimizer):
    """A call ``update(step, param_group, tensors)`` that advances the C++ Adam of DeepSpeed's CPU
    ops by one step on ``tensors``, for the optimizer that steps inside ``optimizer``; None where
    none does (CUDA's FusedAdam recomputes beta^t from the step; a torch optimizer)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    adam = _stepping_optimizer(optimizer)
    if isinstance(adam, DeepSpeedCPUAdam):  # ZeRO-Offload, on GPUs too: one C++ Adam per instance
        needed = ("ds_opt_adam", "opt_id")
    elif isinstance(adam, FusedAdam) and all(p.device.type == "cpu" for g in adam.param_groups for p in g["params"]):
        needed = ("multi_tensor_adam", "_dummy_overflow_buf", "adam_w_mode")  # one C++ Adam per process
    else:
        return None
    for attribute in needed:
        if not hasattr(adam, attribute):
            raise UnknownLayout(f"{type(adam).__name__} without {attribute}")

    def update(step: int, group: dict, tensors: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        hyper = (group["lr"], beta1, beta2, group["eps"])
        if isinstance(adam, DeepSpeedCPUAdam):
            rest = (group["weight_decay"], group["bias_correction"], *tensors)
            adam.ds_opt_adam.adam_update(adam.opt_id, step, *hyper, *rest)
        else:
            lists = [[t] for t in tensors]
            mode, correction = adam.adam_w_mode, int(bool(group["bias_correction"]))
            adam.multi_tensor_adam(
                ADAM_CHUNK, adam._dummy_overflow_buf, lists, *hyper, step, mode, correction, group["weight_decay"]
            )

    return update, adam


def replay_cpu_adam_steps(optimizer) -> int:
    """After a checkpoint load, bring the running beta powers of DeepSpeed's C++ CPU Adam to where an
    uninterrupted run has them; returns the step replayed to (0: nothing to do).

    That Adam (``cpu_adam.h``, behind both DeepSpeedCPUAdam and the CPU accelerator's FusedAdam)
    multiplies beta^t by beta once per step in float32; a new process whose first step is t sets it
    to ``pow(beta, t)`` instead, which rounds differently after most checkpoints, so the bias
    corrections, and every update after a resume, differ in the last bits. Replaying steps 1..t on
    one-element dummy tensors makes the uninterrupted run's products; the real parameters and
    moments are untouched.
    """
    found = _cpu_adam_update(optimizer)
    if found is None:
        return 0
    update, adam = found
    steps = [int(state["step"]) for state in adam.state.values() if "step" in state]
    steps += [int(group["step"]) for group in adam.param_groups if "step" in group]
    last = max(steps, default=0)
    dummy = [torch.zeros(1, dtype=torch.float32) for _ in range(4)]
    for step in range(1, last + 1):
        for group in adam.param_groups:  # as the optimizer's step calls it: group by group
            update(step, group, dummy)
    return last


def shm_allreduce_file(rank: int) -> str | None:
    """The /dev/shm file this rank's DeepSpeed CPU accelerator all-reduces through when every rank is
    on one machine (``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, about
    65 MiB of RAM); None for a backend without one. DeepSpeed creates it at init and never unlinks it."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.comm.torch import TorchBackend

    if not isinstance(ds_comm.cdb, TorchBackend) or ds_comm.cdb.shm_comm_op is None:
        return None
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
