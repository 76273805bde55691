"""Per-rank memory of a training run, estimated before renting GPUs.

The estimate splits one rank's memory into CATEGORIES. Model states (weights, gradients, fp32
master copies, optimizer states) follow from the parameter counts and the ds_config the way
DeepSpeed 0.19 lays them out: flat buffers, partitions and their padding per ZeRO stage,
precision and offload. A frozen parameter costs its weight only, once. Activations are measured,
not guessed: a forward pass of the real model on a small batch counts the bytes of the tensors
autograd saves for backward, scaled to the micro batch. The contrastive loss keeps its logits
(by loss type, local or global, and global batch); communication buckets follow the ds_config.

:mod:`lilt_ds.memory.measure` runs real DeepSpeed steps and reads what the engine actually holds
(and, on a GPU, the allocator's peak), so every estimate can be checked against a measurement.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.synthetic import random_batch
from ..ds_compat import torch_linear_function
from ..engine import engine_dtype, torch_linear, zero_stage
from ..errors import ConfigError
from ..models import parameter_numel
from ..runtime import GPU_TARGET, DeviceFacts
from ..schema import LossSettings, as_section
from .saved_tensors import SavedTensorMeter

GIB, MIB = 2**30, 2**20

CATEGORIES = (
    "frozen_weights",
    "trainable_weights",
    "gradients",
    "master_weights",
    "optimizer_states",
    "activations",
    "loss_buffers",
    "buckets",
)
MODEL_STATES = CATEGORIES[:5]
LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "gradients": "gradients",
    "master_weights": "fp32 master",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "loss_buffers": "loss buffers",
    "buckets": "comm buckets",
}

# fp32 state tensors per trainable element, by ds_config optimizer type
OPTIMIZER_STATES = {
    "adam": 2,
    "adamw": 2,
    "lamb": 2,
    "onebitadam": 2,
    "zerooneadam": 2,
    "onebitlamb": 2,
    "muadam": 2,
    "muadamw": 2,
    "lion": 1,
    "adagrad": 1,
    "sgd": 1,
}
STAGE0_ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's buffered all-reduce of unpartitioned gradients
ZERO12_ALIGNMENT = 2  # DeepSpeedZeroOptimizer pads each flat group to a multiple of 2 x world size

_UNITS = {
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def parse_memory_size(text) -> int:
    """``"32GB"`` -> bytes. GPU makers' GB are binary (a 32GB V100 holds 32 GiB), so GB means GiB here."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]+)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(
            f"GPU memory {text!r} does not parse: write a size with a unit, such as 32GB, 80GiB or 24000MB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


# --------------------------------------------------------------------------------------------------
# What the ds_config decides
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """The ds_config's memory-relevant choices, with DeepSpeed's defaults where a key is absent."""

    stage: int
    world_size: int
    dtype: torch.dtype  # weights (and activations) as the engine casts the model
    grad_dtype: torch.dtype
    optimizer_states: int  # fp32 tensors per trainable element (Adam: exp_avg, exp_avg_sq)
    offload_optimizer: str  # none | cpu | nvme
    offload_param: str
    contiguous_gradients: bool
    overlap_comm: bool
    reduce_bucket_size: int
    prefetch_bucket_size: int
    persistence_threshold: int
    zero3_linear: bool  # ZeRO-3 swaps F.linear for one that saves every input (memory_efficient_linear)

    @classmethod
    def from_ds_config(cls, ds: dict, world_size: int, device: DeviceFacts = GPU_TARGET) -> EngineSettings:
        """``device`` decides the ds_config's "auto" device choices (bf16, overlap_comm): by default a
        GPU that runs bf16, the machine the estimate is for."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        from ..engine import resolve_device_choices

        ds, _ = resolve_device_choices(ds, device)
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size must be a positive integer (GPUs in all), got {world_size!r}")
        zero_stage(ds)
        try:
            zero = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
        except Exception as e:  # pydantic's ValidationError names the key
            raise ConfigError(f"ds_config zero_optimization is not valid: {e}") from None
        dtype = engine_dtype(ds)
        accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
        grad_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(accum, dtype)
        opt_type = str((ds.get("optimizer") or {}).get("type", "AdamW")).lower()
        if opt_type not in OPTIMIZER_STATES:
            raise ConfigError(
                f"the memory model does not know optimizer {opt_type!r}: "
                f"known types are {', '.join(sorted(OPTIMIZER_STATES))}"
            )
        return cls(
            stage=int(zero.stage),
            world_size=world_size,
            dtype=dtype,
            grad_dtype=grad_dtype,
            optimizer_states=OPTIMIZER_STATES[opt_type],
            offload_optimizer=_offload_device(zero.offload_optimizer) if zero.stage >= 1 else "none",
            offload_param=_offload_device(zero.offload_param) if zero.stage == 3 else "none",
            contiguous_gradients=bool(zero.contiguous_gradients),
            overlap_comm=bool(zero.overlap_comm),
            reduce_bucket_size=int(zero.reduce_bucket_size),
            prefetch_bucket_size=int(zero.prefetch_bucket_size),
            persistence_threshold=int(zero.param_persistence_threshold),
            zero3_linear=zero.stage == 3 and bool(zero.memory_efficient_linear),
        )

    @property
    def weight_bytes(self) -> int:
        return self.dtype.itemsize

    @property
    def grad_bytes(self) -> int:
        return self.grad_dtype.itemsize

    def describe(self) -> str:
        offloaded = [
            name
            for name, where in (("optimizer", self.offload_optimizer), ("params", self.offload_param))
            if where != "none"
        ]
        where = self.offload_param if self.offload_param != "none" else self.offload_optimizer
        return f"ZeRO-{self.stage}" + (f" + offload {'+'.join(offloaded)} ({where})" if offloaded else "")


def _offload_device(offload) -> str:
    return "none" if offload is None else str(getattr(offload.device, "value", offload.device))


# --------------------------------------------------------------------------------------------------
# Model states: what DeepSpeed allocates for the parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterInventory:
    """Element counts of a model's parameters, trainable ones in the groups and order DeepSpeed gets them."""

    trainable_groups: tuple[tuple[int, ...], ...]
    frozen: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterInventory:
        from ..engine import param_groups

        groups = tuple(tuple(parameter_numel(p) for p in g["params"]) for g in param_groups(model, 0.0))
        frozen = tuple(parameter_numel(p) for p in model.parameters() if not p.requires_grad)
        return cls(groups, frozen)

    @property
    def trainable(self) -> int:
        return sum(map(sum, self.trainable_groups))


@dataclass
class _Tally:
    """Bytes per category, split into GPU-resident and offloaded (CPU RAM or NVMe)."""

    gpu: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    offloaded: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    def add(self, category: str, nbytes: int, offloaded: bool = False) -> None:
        (self.offloaded if offloaded else self.gpu)[category] += int(nbytes)


def model_state_bytes(inventory: ParameterInventory, settings: EngineSettings, rank: int = 0) -> _Tally:
    """Weights, gradients, master copies, optimizer states and buckets of one rank, as DeepSpeed 0.19 lays them out.

    Each category at its peak during the backward pass, when gradients, optimizer states and
    activations coexist. Not counted: what lives only inside ``step()`` (the fp32 copy of one
    group's gradient partition), after the activations are freed.
    """
    tally = _Tally()
    layout = {0: _unpartitioned_states, 1: _zero12_states, 2: _zero12_states, 3: _zero3_states}[settings.stage]
    layout(inventory, settings, rank, tally)
    return tally


def _unpartitioned_states(inv: ParameterInventory, s: EngineSettings, rank: int, tally: _Tally) -> None:
    """ZeRO-0: every rank holds everything; bf16/fp16 keeps an fp32 flat master copy (FP16_Optimizer)."""
    n = inv.trainable
    tally.add("frozen_weights", sum(inv.frozen) * s.weight_bytes)
    tally.add("trainable_weights", n * s.weight_bytes)
    tally.add("gradients", n * s.grad_bytes)
    if s.dtype != torch.float32:
        tally.add("master_weights", n * 4)
    tally.add("optimizer_states", n * 4 * s.optimizer_states)
    if s.world_size > 1:  # gradients are flattened into all-reduce buffers after backward
        tally.add("buckets", min(n, STAGE0_ALLREDUCE_BUCKET) * s.grad_bytes)


def _zero12_states(inv: ParameterInventory, s: EngineSettings, rank: int, tally: _Tally) -> None:
    """ZeRO-1/2: whole low-precision weights; fp32 master and optimizer states per partition.

    Each group is one flat buffer padded to a multiple of 2 x world size and cut into equal
    partitions. ZeRO-1 keeps every gradient until the backward pass ends, then reduces them.
    ZeRO-2 reduces during the backward pass and keeps the gradients of every parameter that
    overlaps this rank's partition (whole), plus zeros for the padding inside it. With the
    optimizer offloaded they go to an fp32 partition in host memory instead, through one staging
    buffer of the largest parameter on each side; a host copy of the low-precision partition
    carries the updated weights back.
    """
    offload = s.offload_optimizer != "none"
    alignment = ZERO12_ALIGNMENT * s.world_size
    tally.add("frozen_weights", sum(inv.frozen) * s.weight_bytes)
    partition_gradients = 0
    for group in inv.trainable_groups:
        flat = math.ceil(sum(group) / alignment) * alignment
        partition = flat // s.world_size
        tally.add("trainable_weights", flat * s.weight_bytes)
        tally.add("master_weights", partition * 4, offload)
        tally.add("optimizer_states", partition * 4 * s.optimizer_states, offload)
        if offload:
            tally.add("trainable_weights", partition * s.weight_bytes, offloaded=True)
            tally.add("gradients", partition * 4, offloaded=True)
        else:
            partition_gradients += _partition_gradient_numel(group, flat, partition, rank)
    if s.stage == 1:  # all gradients at the end of backward; in a world of one the padded partition is larger
        tally.add("gradients", max(inv.trainable, partition_gradients) * s.grad_bytes)
    else:
        tally.add("gradients", partition_gradients * s.grad_bytes)
    if offload:
        largest = max(n for group in inv.trainable_groups for n in group)
        tally.add("gradients", largest * s.grad_bytes)
        tally.add("gradients", largest * s.grad_bytes, offloaded=True)
    if s.contiguous_gradients or offload:
        tally.add("buckets", s.reduce_bucket_size * s.grad_bytes * (2 if s.overlap_comm else 1))


def _partition_gradient_numel(group: tuple, flat: int, partition: int, rank: int) -> int:
    """Elements of ZeRO-2's gradient buffer: every parameter overlapping the partition, whole, and its padding."""
    start, end = rank * partition, (rank + 1) * partition
    offsets = [0, *itertools.accumulate(group)]
    overlapping = sum(n for n, first in zip(group, offsets) if first < end and first + n > start)
    return overlapping + max(0, min(end, flat) - max(start, offsets[-1]))


def _zero3_states(inv: ParameterInventory, s: EngineSettings, rank: int, tally: _Tally) -> None:
    """ZeRO-3: every parameter, frozen ones too, is cut into world-size partitions of ceil(n / W).

    Parameters with at most ``stage3_param_persistence_threshold`` elements also stay gathered on
    every rank. While a module runs its parameters are gathered whole: the prefetch bucket bounds
    how many at a time.
    """
    W = s.world_size

    def part(n):
        return -(-n // W)

    def persistent(n):
        return n <= s.persistence_threshold

    offload_params, offload_opt = s.offload_param != "none", s.offload_optimizer != "none"
    for category, sizes in (
        ("frozen_weights", inv.frozen),
        ("trainable_weights", [n for g in inv.trainable_groups for n in g]),
    ):
        for n in sizes:
            tally.add(category, part(n) * s.weight_bytes, offload_params and not persistent(n))
            if persistent(n) and W > 1:  # gathered once into a buffer of W partitions, kept
                tally.add(category, part(n) * W * s.weight_bytes)
    trainable = sum(part(n) for g in inv.trainable_groups for n in g)
    tally.add("gradients", trainable * s.grad_bytes, offload_opt)
    tally.add("master_weights", trainable * 4, offload_opt)
    tally.add("optimizer_states", trainable * 4 * s.optimizer_states, offload_opt)
    if s.contiguous_gradients:
        tally.add("buckets", s.reduce_bucket_size * s.grad_bytes)
    gathered = [n for n in (*inv.frozen, *(n for g in inv.trainable_groups for n in g)) if not persistent(n)]
    if gathered and (W > 1 or offload_params):  # a world of one computes on its own partitions in place
        tally.add("buckets", min(sum(gathered), s.prefetch_bucket_size + max(gathered)) * s.weight_bytes)


# --------------------------------------------------------------------------------------------------
# The contrastive loss
# --------------------------------------------------------------------------------------------------


def loss_buffer_bytes(
    loss_cfg: LossSettings | Mapping | None, micro_batch: int, world_size: int, embed_dim: int
) -> int:
    """Bytes the contrastive loss saves for backward on one rank (it runs in fp32).

    Dominated by the logits once the global batch N = micro batch x world size outgrows the
    embedding width: two B x N log-softmax outputs per rank in local mode, two N x N in global
    mode, one B x N for SigLIP up to ``loss.chunk_size`` gathered rows (beyond, it saves only its
    features), none for the chunked and fused losses (their row log-sum-exps only). Besides
    them: the features the matmuls keep (local, gathered, scaled by the temperature) and the labels.
    """
    loss_cfg = as_section(LossSettings, loss_cfg, "loss")
    kind = loss_cfg.type
    local = loss_cfg.local_loss or kind == "siglip"
    B, N, D, f = micro_batch, micro_batch * world_size, embed_dim, 4
    rows = B if local else N
    gathered = N * D if world_size > 1 else 0  # all-gathered copies are new storages
    if kind == "siglip":  # local images x all texts
        if N > loss_cfg.chunk_size:  # blockwise: the features it keeps, no logits
            return f * (B * D + (gathered or B * D))
        return f * (B * N + B * D + B * D + (gathered or B * D))
    features = 2 * (B * D + gathered) if local else 2 * N * D
    if kind in ("chunked", "fused"):  # the fused kernel saves what the chunked loss saves (and falls back to it)
        return f * (features + 2 * rows)
    scaled = 2 * B * D if local else N * D
    return f * (2 * rows * N + features + scaled) + 8 * rows


# --------------------------------------------------------------------------------------------------
# Activations: measured by counting what autograd saves
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationProfile:
    """Saved-activation bytes of one forward pass at ``probe_batch`` samples; linear in the batch.

    ``probe_bytes_zero3``: the same pass as ZeRO-3 runs it (memory_efficient_linear, its default),
    whose F.linear also keeps the inputs of frozen linear layers.
    """

    probe_batch: int
    probe_bytes: int
    probe_bytes_zero3: int
    device: str = "cpu"

    def bytes_per_sample(self, zero3_linear: bool = False) -> float:
        return (self.probe_bytes_zero3 if zero3_linear else self.probe_bytes) / self.probe_batch

    def at(self, micro_batch: int, zero3_linear: bool = False) -> int:
        return round(self.bytes_per_sample(zero3_linear) * micro_batch)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (buffers stay real): skips the seconds-long random init."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_zero_model(cfg, dtype: torch.dtype) -> nn.Module:
    """The config's model on the CPU with all-zero weights: what autograd saves depends on shapes only."""
    from ..models import build_model

    with _parameters_on_meta():
        model = build_model(cfg, load_weights=False)
    materialised: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in materialised:
                    materialised[id(p)] = nn.Parameter(torch.zeros(p.shape, dtype=dtype), requires_grad=p.requires_grad)
                module._parameters[name] = materialised[id(p)]
    return model.to(dtype)


def profile_activations(
    cfg, dtype: torch.dtype = torch.bfloat16, probe_batch: int = 2, device: torch.device | str | None = None
) -> ActivationProfile:
    """Measure saved-activation bytes of one training-mode forward pass at ``probe_batch`` samples.

    Autograd saves everything during the forward pass (the backward only consumes it), so no
    backward is run. Locked towers run under no_grad and save nothing, as in training. ``device``
    (default: this process's accelerator device) matters: kernels save different tensors on a GPU
    (SDPA's flash and memory-efficient attention keep their log-sum-exps, not the probabilities).
    """
    device = torch.device(device) if device is not None else activation_device()
    model = build_zero_model(cfg, dtype).train().to(device)
    vocab = getattr(getattr(model.text.trunk, "config", None), "vocab_size", 1000)
    batch = random_batch(
        cfg, probe_batch, vocab=vocab, dtype=dtype, device=device, length=getattr(model.text, "context_length", None)
    )
    meter = SavedTensorMeter(model.parameters(), backward=False)
    plain = torch_linear_function()

    def linear(input, weight, bias=None):
        meter.note_linear_input(input, weight)
        return plain(input, weight, bias)

    with torch_linear(linear), meter:
        model(*batch.values())  # the meter holds what the graph saved; the graph itself may go
    return ActivationProfile(probe_batch, meter.bytes, meter.zero3_linear_bytes, str(device))


def activation_device() -> torch.device:
    """Where activations are measured: this process's GPU when it has one (its bound device), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


def describe_model(cfg) -> str:
    """``lilt (ln+adapters)``, ``lit``, ``clip``: the mode and what a locked tower unlocks."""
    vision, text = ("+".join(map(str, getattr(cfg.model, t).unlock)) for t in ("vision", "text"))
    unlocks = vision if vision == text else f"vision {vision or '-'}, text {text or '-'}"
    return cfg.mode + (f" ({unlocks})" if unlocks else "")


def uses_checkpointing(cfg) -> bool:
    return bool(cfg.model.vision.grad_checkpointing or cfg.model.text.grad_checkpointing)


@dataclass
class MemoryEstimate:
    """One rank's memory by category: ``gpu`` resident, ``offloaded`` to CPU RAM or NVMe."""

    model: str
    settings: EngineSettings
    micro_batch: int
    checkpointing: bool
    gpu: dict
    offloaded: dict
    budget: int | None = None
    largest_micro_batch: int | None = None

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def offloaded_total(self) -> int:
        return sum(self.offloaded.values())

    def total(self, category: str) -> int:
        """Wherever it lives: what the CPU measurement compares with."""
        return self.gpu[category] + self.offloaded[category]

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.gpu_total <= self.budget


class MemoryModel:
    """One rank's memory for an (experiment config, ds_config, world size) as a function of the micro batch."""

    def __init__(
        self,
        cfg,
        ds_config: dict,
        world_size: int,
        activations: ActivationProfile | None = None,
        probe_batch: int = 2,
        inventory: ParameterInventory | None = None,
        device: DeviceFacts = GPU_TARGET,
    ):
        """``activations`` and ``inventory`` depend on the experiment config only: pass them to reuse
        one measurement across ds_configs and world sizes. ``device`` decides the ds_config's "auto"
        device choices (see :meth:`EngineSettings.from_ds_config`)."""
        from ..models import build_model

        self.cfg = cfg
        self.settings = EngineSettings.from_ds_config(ds_config, world_size, device)
        self.inventory = inventory or ParameterInventory.of(build_model(cfg, load_weights=False, device="meta"))
        self.activations = activations or profile_activations(cfg, self.settings.dtype, probe_batch)
        self.states = {rank: model_state_bytes(self.inventory, self.settings, rank) for rank in range(world_size)}

    def estimate(self, micro_batch: int, budget: int | None = None, rank: int | None = None) -> MemoryEstimate:
        """The given rank's memory, or the fullest rank's; with ``budget`` also the largest micro batch that fits it."""
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ConfigError(f"micro batch must be a positive integer, got {micro_batch!r}")
        if rank is None:
            rank = max(self.states, key=lambda r: sum(self.states[r].gpu.values()))
        states = self.states[rank]
        gpu = dict(states.gpu)
        gpu["activations"] = self.activations.at(micro_batch, self.settings.zero3_linear)
        gpu["loss_buffers"] = loss_buffer_bytes(
            self.cfg.loss, micro_batch, self.settings.world_size, self.cfg.model.embed_dim
        )
        estimate = MemoryEstimate(
            describe_model(self.cfg),
            self.settings,
            micro_batch,
            uses_checkpointing(self.cfg),
            gpu,
            dict(states.offloaded),
            budget,
        )
        if budget is not None:
            estimate.largest_micro_batch = self.largest_micro_batch(budget)
        return estimate

    def largest_micro_batch(self, budget: int) -> int:
        """Largest micro batch whose fullest rank fits ``budget`` bytes of GPU memory (0: not even one)."""

        def fits(micro_batch):
            return self.estimate(micro_batch).gpu_total <= budget

        if not fits(1):
            return 0
        low, high = 1, 2
        while fits(high):
            low, high = high, high * 2
            if high > 2**24:
                return low
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low


def usable_bytes(gpu_memory: int, headroom: float) -> int:
    """What the estimate may fill of a GPU: the rest goes to the CUDA context, allocator slack and
    short-lived buffers the estimate leaves out (backward's activation gradients, step temporaries)."""
    check_headroom(headroom)
    return int(gpu_memory * (1 - headroom))


def check_headroom(headroom: float) -> None:
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise ConfigError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
