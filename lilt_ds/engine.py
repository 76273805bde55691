"""The DeepSpeed engine: ds_config loading with "auto" values, trainable-only parameter groups.

The ds_config owns ZeRO stage, precision, offload and the optimizer/scheduler blocks; the experiment
config owns batch sizes, learning rate and schedule length. ``"auto"`` (the Hugging Face
convention, which core DeepSpeed does not resolve) and absent keys are filled from the experiment
config; explicit values that contradict it are refused, naming both. Only trainable parameters
reach ``deepspeed.initialize``, so frozen ones get no gradient, fp32 copy or optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os

import torch
from torch import nn

from . import ds_compat
from .config import check_compile
from .ds_configs import ds_config_path
from .errors import ConfigError
from .models.dual_encoder import MAX_LOGIT_SCALE
from .optim import build_scheduler, group_options, param_groups
from .runtime import DeviceFacts, present_device

log = logging.getLogger("lilt_ds")

AUTO = "auto"
ZERO_STAGES = (0, 1, 2, 3)


def load_ds_config(path: str) -> dict:
    path = ds_config_path(path)
    if not path:
        raise ConfigError("no ds_config given: pass --deepspeed_config ds_configs/zero2.json (or another file there)")
    if not os.path.isfile(path):
        raise ConfigError(f"ds_config {path} does not exist: pick one of ds_configs/*.json")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object")
    return ds


def _leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every value of a nested ds_config."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _fill(ds: dict, path: str, expected, source: str, ds_name: str) -> None:
    """Set ds[path] to ``expected`` when absent or "auto"; refuse an explicit value that differs."""
    *parents, leaf = path.split(".")
    node = ds
    for key in parents:
        node = node.setdefault(key, {})
    value = node.get(leaf, AUTO)
    if value == AUTO:
        node[leaf] = expected
        return
    same = (
        abs(float(value) - float(expected)) <= 1e-12 * max(1.0, abs(float(expected)))
        if isinstance(value, (int, float)) and isinstance(expected, (int, float))
        else value == expected
    )
    if not same:
        raise ConfigError(
            f"ds_config {ds_name} sets {path}={value!r} but the experiment config gives {source}={expected!r}: "
            f'make them agree, or write "auto" in the ds_config'
        )


def zero_stage(ds: dict, ds_name: str = "ds_config") -> int:
    """The ds_config's ZeRO stage (0 when it names none), refused unless DeepSpeed has it."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(
            f"ds_config {ds_name}: unknown ZeRO stage {stage!r} in zero_optimization.stage; use 0, 1, 2 or 3"
        )
    return stage


def _check_precision_and_stage(ds: dict, ds_name: str) -> None:
    from deepspeed.accelerator import get_accelerator

    zero_stage(ds, ds_name)
    accel = get_accelerator()
    if ds.get("fp16", {}).get("enabled") and not accel.is_fp16_supported():
        raise ConfigError(
            f"ds_config {ds_name} enables fp16, which the {accel.device_name()} accelerator does not support: "
            "use a bf16 config such as ds_configs/zero2.json"
        )
    if ds.get("bf16", {}).get("enabled") and not accel.is_bf16_supported():
        raise ConfigError(
            f"ds_config {ds_name} enables bf16, which this device does not support: use ds_configs/zero2_fp16.json"
        )
    for key in ("offload_optimizer", "offload_param"):
        offload = ds.get("zero_optimization", {}).get(key) or {}
        if offload.get("device") == "nvme":
            path = offload.get("nvme_path")
            if not path or not os.path.isdir(path) or not os.access(path, os.W_OK):
                raise ConfigError(
                    f"ds_config {ds_name}: zero_optimization.{key}.nvme_path={path!r} is not a writable folder: "
                    "point it at a folder on a local NVMe drive"
                )


DEVICE_CHOICES = ("bf16.enabled", "zero_optimization.overlap_comm")
"""ds_config keys whose "auto" the device decides (the experiment config fills the others)."""


def resolve_device_choices(ds: dict, device: DeviceFacts, ds_name: str = "ds_config") -> tuple[dict, list[str]]:
    """A copy of ``ds`` with the device's "auto" keys decided for ``device``, and one line per decision.

    ``bf16.enabled``: bf16 where the device computes it natively (CUDA compute capability 8.0+,
    CPUs with AVX512-BF16, AMX or Arm BF16), fp32 elsewhere, where bf16 is emulated and slower.
    ``zero_optimization.overlap_comm``: on for GPUs (reductions overlap the backward pass, at the
    cost of a second reduce bucket), off on the CPU, whose accelerator has no streams to overlap on.
    An explicit true/false is obeyed.
    """
    ds = copy.deepcopy(ds)
    notes = []
    bf16 = ds.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == AUTO:
        bf16["enabled"] = device.native_bf16
        notes.append(
            f"precision {'bf16' if device.native_bf16 else 'fp32'} (ds_config {ds_name}: "
            f"bf16.enabled=auto; {device.reason})"
        )
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("overlap_comm") == AUTO:
        zero["overlap_comm"] = device.is_gpu
        notes.append(
            f"overlap_comm {'on' if device.is_gpu else 'off'} (ds_config {ds_name}: "
            f"zero_optimization.overlap_comm=auto on {'a GPU' if device.is_gpu else 'the CPU'})"
        )
    return ds, notes


def resolve_ds_config(
    ds: dict, cfg, world_size: int, total_steps: int, ds_name: str = "ds_config", device: DeviceFacts | None = None
) -> dict:
    """A copy of ``ds`` with every "auto" filled (from the experiment config, and the device's keys from
    ``device``, default this process's), checked for contradictions."""
    ds, notes = resolve_device_choices(ds, device or present_device(), ds_name)
    for note in notes:
        log.info("%s", note)
    train = cfg.train
    micro, accum = train.micro_batch_size, train.grad_accum_steps
    ratio = train.min_lr / train.lr
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", ds_name)
    _fill(ds, "gradient_accumulation_steps", accum, "train.grad_accum_steps", ds_name)
    _fill(
        ds,
        "train_batch_size",
        micro * accum * world_size,
        f"train.micro_batch_size x train.grad_accum_steps x world size ({micro} x {accum} x {world_size})",
        ds_name,
    )
    _fill(ds, "gradient_clipping", train.grad_clip, "train.grad_clip", ds_name)
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    _fill(ds, "optimizer.params.lr", train.lr, "train.lr", ds_name)
    _fill(ds, "optimizer.params.weight_decay", train.weight_decay, "train.weight_decay", ds_name)
    _resolve_schedule(ds, train, total_steps, ratio, ds_name)
    leftover = [k for k, v in _leaves(ds) if v == AUTO]
    if leftover:
        raise ConfigError(
            f"ds_config {ds_name}: no experiment setting fills {', '.join(leftover)}; give explicit values"
        )
    _check_precision_and_stage(ds, ds_name)
    if check_compile(train.compile) is not None and zero_stage(ds, ds_name) == 3:
        raise ConfigError(
            f"train.compile={train.compile} with ZeRO stage 3 (ds_config {ds_name}): ZeRO-3 gathers each "
            "module's weights in hooks around its forward, which torch.compile of the towers does not see (lilt_ds "
            "checks compiled towers with ZeRO 0-2 only); use ds_configs/zero2.json, or train.compile=false"
        )
    if cfg.memory.frozen_recompute and zero_stage(ds, ds_name) == 3:
        raise ConfigError(
            f"memory.frozen_recompute=true does not work with ZeRO stage 3 (ds_config {ds_name}): ZeRO-3 releases "
            "the weights after forward and the recompute in backward finds them partitioned; use a stage 0-2 "
            "config such as ds_configs/zero2.json, or set memory.frozen_recompute=false"
        )
    return ds


def _resolve_schedule(ds: dict, train, total_steps: int, ratio: float, ds_name: str) -> None:
    """``train.schedule`` in the ds_config's scheduler block: cosine and constant are DeepSpeed's
    WarmupCosineLR (constant: a cosine that ends where it starts); constant_cooldown has no DeepSpeed
    scheduler, so it replaces a block that left every value to the experiment config ("auto") and
    ``initialize`` passes its own; a block with explicit values keeps its schedule and is refused."""
    schedule = train.schedule
    if schedule == "constant_cooldown":
        block = ds.get("scheduler")
        settable = {k: v for k, v in ((block or {}).get("params") or {}).items() if k != "warmup_type"}
        if block and (block.get("type") != "WarmupCosineLR" or any(v != AUTO for v in settable.values())):
            raise ConfigError(
                f"train.schedule=constant_cooldown: ds_config {ds_name} has its own scheduler block "
                f'({block.get("type")} with explicit values); set its values to "auto" or remove the block to '
                "let train.schedule decide, or choose train.schedule=cosine or constant"
            )
        ds.pop("scheduler", None)
        return
    ds.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {"warmup_type": "linear"}})
    if ds["scheduler"].get("type") == "WarmupCosineLR":
        warmup = max(1, min(train.warmup_steps, total_steps))  # DeepSpeed needs >= 1
        _fill(
            ds,
            "scheduler.params.total_num_steps",
            total_steps,
            "the schedule length (train.epochs / train.max_steps)",
            ds_name,
        )
        _fill(ds, "scheduler.params.warmup_num_steps", warmup, "train.warmup_steps", ds_name)
        _fill(ds, "scheduler.params.warmup_min_ratio", ratio, "train.min_lr / train.lr", ds_name)
        end = (1.0, "train.schedule=constant") if schedule == "constant" else (ratio, "train.min_lr / train.lr")
        _fill(ds, "scheduler.params.cos_min_ratio", end[0], end[1], ds_name)
    elif schedule == "constant":
        raise ConfigError(
            f"train.schedule=constant: ds_config {ds_name}'s scheduler is {ds['scheduler'].get('type')}, "
            "not WarmupCosineLR; use a ds_config with the shipped scheduler block or train.schedule=cosine"
        )


def initialize(model: nn.Module, ds_config: dict, cfg, total_steps: int | None = None):
    """``deepspeed.initialize`` with the trainable parameter groups of ``cfg`` (the experiment config:
    weight decay, per-tower learning rates, layer decay), and, where ``resolve_ds_config`` left the
    schedule to it (``train.schedule=constant_cooldown``), its scheduler; returns (engine,
    optimizer, scheduler)."""
    import deepspeed

    model.to(engine_dtype(ds_config))  # buffers too (BatchNorm statistics), which DeepSpeed leaves as they are
    groups = param_groups(model, lr=ds_config["optimizer"]["params"].get("lr"), **group_options(cfg))
    client_scheduler = None
    if "scheduler" not in ds_config and cfg.train.schedule == "constant_cooldown":
        if total_steps is None:
            raise ValueError("initialize: train.schedule=constant_cooldown needs the schedule length (total_steps)")
        client_scheduler = functools.partial(build_scheduler, cfg=cfg, total_steps=total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_config, lr_scheduler=client_scheduler
    )
    if getattr(scheduler, "last_batch_iteration", None) == -1:
        # DeepSpeed's schedules start "before step 0" with lr 0, which wastes the first optimizer
        # step; start at step 0 (warmup's first value), as the scheduler steps after every update
        scheduler.step(0)
    backend = check_compile(cfg.train.compile)
    if backend is not None:  # in place: parameter names, hooks and checkpoints stay as they are
        for tower in (model.vision, model.text):
            tower.trunk.compile(backend=backend)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # one rank has nothing to average, yet ZeRO-0 would flatten every gradient into buckets,
        # all-reduce them with itself and copy them back after each backward (ZeRO-1/2/3 move
        # gradients into their partitions in that reduction: they keep it)
        ds_compat.disable_backward_allreduce(engine)
    return engine, optimizer, scheduler


@contextlib.contextmanager
def torch_linear(function=None):
    """``function`` (default: torch's own, :func:`lilt_ds.ds_compat.torch_linear_function`) as
    torch.nn.functional.linear inside the block, and whatever was there before after it: work beside
    a ZeRO-3 engine must not run through its linear."""
    before = torch.nn.functional.linear
    torch.nn.functional.linear = function or ds_compat.torch_linear_function()
    try:
        yield
    finally:
        torch.nn.functional.linear = before


def engine_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


@torch.no_grad()
def trainable_fingerprint(engine) -> str:
    """sha256 of every trainable weight (gathered under ZeRO-3); call on all ranks together."""
    import hashlib

    import deepspeed

    digest = hashlib.sha256()
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param], enabled=ds_compat.is_zero3(param)):
                digest.update(name.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def clamp_logit_scale(engine) -> None:
    """Clamp the temperature to [0, ln 100] after a step: the module copy and the fp32 master alike.

    Clamping only the bf16 module parameter would be undone at the next step, which copies the
    (unclamped) fp32 master back; under ZeRO-3 the parameter must be gathered to be written. Each
    rank clamps the part of the master it holds: no communication (a clamp is elementwise).
    """
    import deepspeed
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    param = engine.module.logit_scale
    if not param.requires_grad:
        return
    zero3 = ds_compat.is_zero3(param)
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=zero3):
        param.data.clamp_(0, MAX_LOGIT_SCALE)
    if zero3:  # each rank clamps its own fp32 partition (the "full" setter mis-slices a 1-element param)
        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(0, MAX_LOGIT_SCALE))
        return
    master = ds_compat.local_fp32_master(engine, param)
    if master is not None:
        master.clamp_(0, MAX_LOGIT_SCALE)
