"""Per-rank memory of a training run: estimated before renting GPUs, measured after.

The estimate splits one rank's memory into CATEGORIES. Model states (weights, gradients, fp32
master copies, optimizer states) follow from the parameter counts and the ds_config the way
DeepSpeed 0.19 lays them out: flat buffers, partitions and their padding per ZeRO stage,
precision and offload. A frozen parameter costs its weight only, once. Activations are measured,
not guessed: a forward pass of the real model on a small batch counts the bytes of the tensors
autograd saves for backward, scaled to the micro batch. The contrastive loss keeps its logits
(by loss type, local or global, and global batch); communication buckets follow the ds_config.

``measure_training_memory`` runs real DeepSpeed steps and reads what the engine actually holds
(and, on a GPU, the allocator's peak), so every estimate can be checked against a measurement.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import itertools
import math
import os
import re
import textwrap
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ConfigError
from .runtime import GPU_TARGET, DeviceFacts

GIB, MIB = 2**30, 2**20

CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "master_weights", "optimizer_states",
              "activations", "loss_buffers", "buckets")
MODEL_STATES = CATEGORIES[:5]
LABELS = {
    "frozen_weights": "frozen weights", "trainable_weights": "trainable weights", "gradients": "gradients",
    "master_weights": "fp32 master", "optimizer_states": "optimizer states", "activations": "activations",
    "loss_buffers": "loss buffers", "buckets": "comm buckets",
}

# fp32 state tensors per trainable element, by ds_config optimizer type
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "lamb": 2, "onebitadam": 2, "zerooneadam": 2, "onebitlamb": 2,
                    "muadam": 2, "muadamw": 2, "lion": 1, "adagrad": 1, "sgd": 1}
STAGE0_ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed's buffered all-reduce of unpartitioned gradients
ZERO12_ALIGNMENT = 2  # DeepSpeedZeroOptimizer pads each flat group to a multiple of 2 x world size

_UNITS = {"b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MIB, "mb": MIB, "mib": MIB,
          "g": GIB, "gb": GIB, "gib": GIB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory_size(text) -> int:
    """``"32GB"`` -> bytes. GPU makers' GB are binary (a 32GB V100 holds 32 GiB), so GB means GiB here."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]+)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"GPU memory {text!r} does not parse: "
                          "write a size with a unit, such as 32GB, 80GiB or 24000MB")
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
    dtype: torch.dtype             # weights (and activations) as the engine casts the model
    grad_dtype: torch.dtype
    optimizer_states: int          # fp32 tensors per trainable element (Adam: exp_avg, exp_avg_sq)
    offload_optimizer: str         # none | cpu | nvme
    offload_param: str
    contiguous_gradients: bool
    overlap_comm: bool
    reduce_bucket_size: int
    prefetch_bucket_size: int
    persistence_threshold: int
    zero3_linear: bool             # ZeRO-3 swaps F.linear for one that saves every input (memory_efficient_linear)

    @classmethod
    def from_ds_config(cls, ds: dict, world_size: int, device: DeviceFacts = GPU_TARGET) -> "EngineSettings":
        """``device`` decides the ds_config's "auto" device choices (bf16, overlap_comm): by default a
        GPU that runs bf16, the machine the estimate is for."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        from .engine import resolve_device_choices

        ds, _ = resolve_device_choices(ds, device)
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size must be a positive integer (GPUs in all), got {world_size!r}")
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"unknown ZeRO stage {stage!r} in zero_optimization.stage; use 0, 1, 2 or 3")
        try:
            zero = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
        except Exception as e:  # pydantic's ValidationError names the key
            raise ConfigError(f"ds_config zero_optimization is not valid: {e}") from None
        dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else \
            torch.float16 if ds.get("fp16", {}).get("enabled") else torch.float32
        accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
        grad_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(accum, dtype)
        opt_type = str((ds.get("optimizer") or {}).get("type", "AdamW")).lower()
        if opt_type not in OPTIMIZER_STATES:
            raise ConfigError(f"the memory model does not know optimizer {opt_type!r}: "
                              f"known types are {', '.join(sorted(OPTIMIZER_STATES))}")
        return cls(
            stage=int(zero.stage), world_size=world_size, dtype=dtype, grad_dtype=grad_dtype,
            optimizer_states=OPTIMIZER_STATES[opt_type],
            offload_optimizer=_offload_device(zero.offload_optimizer) if zero.stage >= 1 else "none",
            offload_param=_offload_device(zero.offload_param) if zero.stage == 3 else "none",
            contiguous_gradients=bool(zero.contiguous_gradients), overlap_comm=bool(zero.overlap_comm),
            reduce_bucket_size=int(zero.reduce_bucket_size), prefetch_bucket_size=int(zero.prefetch_bucket_size),
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
        offloaded = [name for name, where in (("optimizer", self.offload_optimizer), ("params", self.offload_param))
                     if where != "none"]
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
    def of(cls, model: nn.Module) -> "ParameterInventory":
        from .engine import param_groups

        def numel(p):
            return getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves numel() == 0

        groups = tuple(tuple(numel(p) for p in g["params"]) for g in param_groups(model, 0.0))
        frozen = tuple(numel(p) for p in model.parameters() if not p.requires_grad)
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
    for category, sizes in (("frozen_weights", inv.frozen),
                            ("trainable_weights", [n for g in inv.trainable_groups for n in g])):
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


def loss_buffer_bytes(loss_cfg, micro_batch: int, world_size: int, embed_dim: int) -> int:
    """Bytes the contrastive loss saves for backward on one rank (it runs in fp32).

    Dominated by the logits once the global batch N = micro batch x world size outgrows the
    embedding width: two B x N log-softmax outputs per rank in local mode, two N x N in global
    mode, one B x N for SigLIP, none for the chunked and fused losses (their row log-sum-exps only). Besides
    them: the features the matmuls keep (local, gathered, scaled by the temperature) and the labels.
    """
    kind = (loss_cfg or {}).get("type", "clip")
    local = bool((loss_cfg or {}).get("local_loss", True)) or kind == "siglip"
    B, N, D, f = micro_batch, micro_batch * world_size, embed_dim, 4
    rows = B if local else N
    gathered = N * D if world_size > 1 else 0   # all-gathered copies are new storages
    if kind == "siglip":                           # local images x all texts
        return f * (B * N + B * D + B * D + (gathered or B * D))
    features = 2 * (B * D + gathered) if local else 2 * N * D
    if kind in ("chunked", "fused"):  # the fused kernel saves what the chunked loss saves (and falls back to it)
        return f * (features + 2 * rows)
    scaled = 2 * B * D if local else N * D
    return f * (2 * rows * N + features + scaled) + 8 * rows


# --------------------------------------------------------------------------------------------------
# Activations: measured by counting what autograd saves
# --------------------------------------------------------------------------------------------------


class _SaveInput(torch.autograd.Function):
    """Saves its input for backward and returns nothing useful: shows a tensor to the active saved-tensor hook."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.save_for_backward(tensor)
        return tensor.new_empty(0)

    @staticmethod
    def backward(ctx, grad):
        return None


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward inside ``with meter:`` (parameters excluded).

    A saved view keeps its whole storage alive, so storages are counted, each once; references
    to them are held until the meter is dropped so that no address is reused meanwhile.
    Non-reentrant activation checkpointing hides what its blocks save (its own hooks take
    precedence) and shows their inputs: exactly what stays in memory.

    ``note_linear_input`` answers a second question in the same pass: what ZeRO-3 would keep
    besides. Its replacement of F.linear saves a linear layer's input even when the weight is
    frozen (plain autograd then keeps only the weight); ``zero3_linear_bytes`` adds those inputs.

    ``backward=False`` for a pass that is never backpropagated: the graph then keeps detached
    aliases, so that it dies with its outputs. (A saved output handed back as is ties output and
    graph in a cycle that Python's collector cannot see; only a backward pass breaks it.)
    """

    def __init__(self, parameters, backward: bool = True):
        self._param_ids = {id(p) for p in parameters}
        self._backward = backward
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._frozen_linear_inputs: dict[int, torch.UntypedStorage] = {}
        self._target = self._storages
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self._storages.values())

    @property
    def zero3_linear_bytes(self) -> int:
        union = {**self._frozen_linear_inputs, **self._storages}
        return sum(s.nbytes() for s in union.values())

    def note_linear_input(self, tensor: torch.Tensor, weight: torch.Tensor) -> None:
        """Call from F.linear: an input ZeRO-3 would save and autograd does not (through the active hook,
        so that inside a checkpointed block it is not counted, as there it would not be kept)."""
        if torch.is_grad_enabled() and tensor.requires_grad and not weight.requires_grad:
            self._target = self._frozen_linear_inputs
            try:
                _SaveInput.apply(tensor)
            finally:
                self._target = self._storages

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        while tensor is not None:
            if id(tensor) in self._param_ids:
                return True
            tensor = tensor._base
        return False

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._is_parameter(tensor):
            return tensor  # as is: ZeRO-3 finds its partitioned parameters by their attributes
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.nbytes():
                self._target.setdefault(storage.data_ptr(), storage)
        return tensor if self._backward else tensor.detach()

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


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


def random_batch(cfg, batch: int, dtype: torch.dtype, device="cpu", vocab: int = 1000) -> tuple:
    """(images, input_ids, attention_mask) of the config's image size and training text length."""
    size, length = cfg.model.image_size, cfg.data.max_length
    return (torch.randn(batch, 3, size, size, device=device).to(dtype),
            torch.randint(0, vocab, (batch, length), device=device),
            torch.ones(batch, length, dtype=torch.long, device=device))


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
    from .models import build_model

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


@contextlib.contextmanager
def _linear(function):
    """Use ``function`` as torch.nn.functional.linear inside the block (what ZeRO-3 does for good)."""
    original = torch.nn.functional.linear
    torch.nn.functional.linear = function
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def _plain_linear():
    """The original F.linear, also after a ZeRO-3 engine in this process replaced it."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    return getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", torch.nn.functional.linear)


def profile_activations(cfg, dtype: torch.dtype = torch.bfloat16, probe_batch: int = 2,
                        device: torch.device | str | None = None) -> ActivationProfile:
    """Measure saved-activation bytes of one training-mode forward pass at ``probe_batch`` samples.

    Autograd saves everything during the forward pass (the backward only consumes it), so no
    backward is run. Locked towers run under no_grad and save nothing, as in training. ``device``
    (default: this process's accelerator device) matters: kernels save different tensors on a GPU
    (SDPA's flash and memory-efficient attention keep their log-sum-exps, not the probabilities).
    """
    device = torch.device(device) if device is not None else activation_device()
    model = build_zero_model(cfg, dtype).train().to(device)
    vocab = getattr(getattr(model.text.trunk, "config", None), "vocab_size", 1000)
    batch = random_batch(cfg, probe_batch, dtype, device, vocab=min(1000, vocab))
    meter = SavedTensorMeter(model.parameters(), backward=False)
    plain = _plain_linear()

    def linear(input, weight, bias=None):
        meter.note_linear_input(input, weight)
        return plain(input, weight, bias)

    with _linear(linear), meter:
        model(*batch)  # the meter holds what the graph saved; the graph itself may go
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
    vision, text = ("+".join(map(str, cfg.model[t].unlock or [])) for t in ("vision", "text"))
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

    def __init__(self, cfg, ds_config: dict, world_size: int, activations: ActivationProfile | None = None,
                 probe_batch: int = 2, inventory: ParameterInventory | None = None,
                 device: DeviceFacts = GPU_TARGET):
        """``activations`` and ``inventory`` depend on the experiment config only: pass them to reuse
        one measurement across ds_configs and world sizes. ``device`` decides the ds_config's "auto"
        device choices (see :meth:`EngineSettings.from_ds_config`)."""
        from .models import build_model

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
        gpu["loss_buffers"] = loss_buffer_bytes(self.cfg.loss, micro_batch, self.settings.world_size,
                                                self.cfg.model.embed_dim)
        estimate = MemoryEstimate(describe_model(self.cfg), self.settings, micro_batch, uses_checkpointing(self.cfg),
                                  gpu, dict(states.offloaded), budget)
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
    _check_headroom(headroom)
    return int(gpu_memory * (1 - headroom))


def _check_headroom(headroom: float) -> None:
    if not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise ConfigError(f"headroom must be a fraction in [0, 1), got {headroom!r}")


# --------------------------------------------------------------------------------------------------
# Measurement: what a real engine holds
# --------------------------------------------------------------------------------------------------


class _StorageLedger:
    """Distinct storages by category: the first category that claims a storage keeps it."""

    def __init__(self):
        self.owner: dict[tuple, tuple[str, int]] = {}

    def claim(self, tensor, category: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        if storage.nbytes():
            self.owner.setdefault((storage.device, storage.data_ptr()), (category, storage.nbytes()))

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys((*MODEL_STATES, "buckets", "other"), 0)
        for category, nbytes in self.owner.values():
            totals[category] += nbytes
        return totals


# DeepSpeed's attribute names for its buffers; the first match decides
_ATTRIBUTE_CATEGORIES = (
    (("ipg",), "buckets"),                                         # ipg_buckets: gradient reduce buckets
    (("norm", "overflow", "inf_or_nan"), "other"),                 # scalars: _global_grad_norm, flags
    (("grad",), "gradients"),                                      # averaged_gradients, grad_partitions_flat_buffer
    (("fp32",), "master_weights"),                                 # single_partition_of_fp32_groups, ...
    (("fp16", "bit16", "bf16", "lp_param"), "trainable_weights"),  # param_buffer_of_bit16_for_cpu_offload_groups
)


def _category_of_attribute(path: str) -> str:
    path = path.lower()
    return next((category for keys, category in _ATTRIBUTE_CATEGORIES if any(k in path for k in keys)), "other")


def _walk_attributes(obj, path: str, ledger: _StorageLedger, visited: set, depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        ledger.claim(obj, _category_of_attribute(path))  # not its .grad: a view into a bucket, claimed last
        return
    if depth > 5 or id(obj) in visited or isinstance(obj, nn.Module):
        return
    visited.add(id(obj))
    if isinstance(obj, dict):  # keys may be tensors: name them by type, printing one costs milliseconds
        children = ((f"{path}.{k if isinstance(k, (str, int)) else type(k).__name__}", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((path, v) for v in obj)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        children = ((f"{path}.{k}", v) for k, v in vars(obj).items())
    else:
        return
    for child_path, child in children:
        _walk_attributes(child, child_path, ledger, visited, depth + 1)


def engine_state_bytes(engine) -> dict[str, int]:
    """Bytes of the distinct storages a DeepSpeed engine holds now: model-state categories, buckets, other.

    The module's parameters give the weights (their ZeRO-3 partitions included; a gathered
    ZeRO-3 parameter counts as bucket) and gradients; the wrapped torch optimizer's state gives
    the optimizer states and its fp32 parameters the master copies; the rest of DeepSpeed's
    tensors (gradient partitions, reduce buckets) are found in its optimizer's attributes.
    """
    ledger = _StorageLedger()
    params = list(engine.module.parameters())
    for p in params:
        weights = "trainable_weights" if p.requires_grad else "frozen_weights"
        partition = getattr(p, "ds_tensor", None)
        ledger.claim(partition, weights)
        ledger.claim(p.data, weights if partition is None or getattr(p, "ds_persist", False) else "buckets")
    wrapper = engine.optimizer
    basic = getattr(wrapper, "optimizer", wrapper)
    for state in basic.state.values():
        for value in state.values():
            ledger.claim(value, "optimizer_states")
    for group in basic.param_groups:
        for p in group["params"]:
            ledger.claim(p, "master_weights")  # the module's own parameters were claimed above
            ledger.claim(p.grad, "gradients")
    if wrapper is not basic:  # before the parameters' .grad: under ZeRO those are views into buckets
        _walk_attributes(wrapper, "optimizer", ledger, {id(basic)})
    for p in params:
        ledger.claim(p.grad, "gradients")
        ledger.claim(getattr(p, "grad_accum", None), "gradients")
    return ledger.totals()


@dataclass
class Measurement:
    """What two real DeepSpeed steps held on this rank: engine tensors by category and, on a GPU, the peak."""

    device: str
    world_size: int
    micro_batch: int
    bytes: dict
    peak_allocated: int | None = None
    peak_reserved: int | None = None


def measure_training_memory(cfg, ds_config: dict, micro_batch: int, ds_name: str = "ds_config") -> Measurement:
    """Run two DeepSpeed training steps on random data and read the memory of the second one.

    Model states are read from the engine's tensors when the first and the last gradient arrive
    during the backward pass and once after it (DeepSpeed's reduction): each category's peak counts.
    Activations and loss buffers are the saved-tensor bytes of the step's forward and loss.
    """
    from .runtime import init_distributed

    rank, world_size, _ = init_distributed()
    with _linear(_plain_linear()):  # ZeRO-3 replaces F.linear for the rest of the process: undo it after
        return _measure(cfg, ds_config, micro_batch, ds_name, world_size)


def _measure(cfg, ds_config: dict, micro_batch: int, ds_name: str, world_size: int) -> Measurement:
    from deepspeed.accelerator import get_accelerator

    from . import engine as ds_engine
    from .losses import build_loss
    from .models import build_model
    from .train import as_fp32

    cfg = copy.deepcopy(cfg)
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = micro_batch, 1
    ds = ds_engine.resolve_ds_config(ds_config, cfg, world_size, total_steps=2, ds_name=ds_name)
    dtype = ds_engine.engine_dtype(ds)
    torch.manual_seed(cfg.seed)
    engine, _, _ = ds_engine.initialize(build_model(cfg, load_weights=False), ds, cfg.train.weight_decay)
    loss_fn = build_loss(cfg.loss)
    batch = random_batch(cfg, micro_batch, dtype, engine.device)
    accelerator = get_accelerator()
    on_gpu = torch.device(engine.device).type != "cpu"

    def step(measure: bool) -> dict:
        """One training step; with ``measure``, the peak bytes by category it held."""
        params = list(engine.module.parameters())
        with SavedTensorMeter(params) as activations:
            outputs = as_fp32(engine(*batch))
        with SavedTensorMeter(params) as loss_buffers:
            loss = loss_fn(*outputs)
        peaks = {"activations": activations.bytes, "loss_buffers": loss_buffers.bytes}
        del outputs, activations, loss_buffers  # the meters hold storages: let backward free them

        def snapshot():
            for category, nbytes in engine_state_bytes(engine).items():
                peaks[category] = max(nbytes, peaks.get(category, 0))

        trainable = [p for p in params if p.requires_grad] if measure else []
        arrived = itertools.count(1)

        def on_gradient(_):  # the first gradient (buckets are up) and the last one (every gradient is)
            if next(arrived) in (1, len(trainable)):
                snapshot()

        hooks = [p.register_post_accumulate_grad_hook(on_gradient) for p in trainable]
        engine.backward(loss)
        for hook in hooks:
            hook.remove()
        if measure:
            snapshot()
        engine.step()
        return peaks

    step(measure=False)  # the first step allocates the optimizer states
    if on_gpu:
        accelerator.synchronize()
        accelerator.reset_peak_memory_stats()
    result = Measurement(str(engine.device), world_size, micro_batch, step(measure=True))
    if on_gpu:
        accelerator.synchronize()
        result.peak_allocated = accelerator.max_memory_allocated()
        result.peak_reserved = accelerator.max_memory_reserved()
    engine.destroy()
    return result


# --------------------------------------------------------------------------------------------------
# Reports: Markdown, CSV, PNG
# --------------------------------------------------------------------------------------------------


def estimate_rows(estimates: list[MemoryEstimate]) -> list[dict]:
    """One flat record per estimate (bytes), the CSV's rows."""
    rows = []
    for e in estimates:
        row = {"model": e.model, "zero": e.settings.describe(), "checkpointing": e.checkpointing,
               "world_size": e.settings.world_size, "micro_batch": e.micro_batch}
        row.update({c: e.gpu[c] for c in CATEGORIES})
        row.update(gpu_total=e.gpu_total, offloaded=e.offloaded_total, budget=e.budget, fits=e.fits,
                   largest_micro_batch=e.largest_micro_batch)
        rows.append(row)
    return rows


def estimate_table(estimates: list[MemoryEstimate]) -> str:
    """Markdown: GiB per rank by category on the GPU, the total, what is offloaded, and the verdict."""
    budget = next((e.budget for e in estimates if e.budget is not None), None)
    head = ["model", "ZeRO", "ckpt", *(LABELS[c] for c in CATEGORIES), "GPU total", "offloaded"]
    if budget is not None:
        head += [f"fits {format_gib(budget)} GiB", "largest micro batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in estimates:
        cells = [e.model, e.settings.describe(), "yes" if e.checkpointing else "no",
                 *(format_gib(e.gpu[c]) for c in CATEGORIES), f"**{format_gib(e.gpu_total)}**",
                 format_gib(e.offloaded_total)]
        if budget is not None:
            cells += ["yes" if e.fits else "**no**", str(e.largest_micro_batch)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_rows(estimate: MemoryEstimate, measured: Measurement) -> list[dict]:
    """Estimate next to measurement, like with like: each category wherever it lives (GPU, CPU RAM),
    model states and all categories summed, error in percent. On a GPU also the allocator's peak,
    which holds what no category counts (what lives only inside backward and the optimizer step):
    shown with its excess over the measured categories, which the estimate's headroom must cover."""
    pairs = [(LABELS[c], estimate.total(c), measured.bytes[c]) for c in CATEGORIES]
    pairs.insert(len(MODEL_STATES), ("model states", sum(estimate.total(c) for c in MODEL_STATES),
                                     sum(measured.bytes[c] for c in MODEL_STATES)))
    categories = sum(measured.bytes[c] for c in CATEGORIES)
    pairs.append(("all categories", sum(estimate.total(c) for c in CATEGORIES), categories))
    rows = [{"quantity": name, "estimate": est, "measured": got,
             "error_percent": None if not got else 100.0 * (est - got) / got} for name, est, got in pairs]
    rows.append({"quantity": "other engine tensors (not estimated)", "estimate": None,
                 "measured": measured.bytes.get("other", 0), "error_percent": None})
    if measured.peak_allocated is not None:
        rows += [{"quantity": "GPU peak allocated (max_memory_allocated): the categories plus activation gradients, "
                              "loss temporaries, optimizer-step temporaries and cuBLAS workspace",
                  "estimate": None, "measured": measured.peak_allocated, "error_percent": None},
                 {"quantity": "GPU peak allocated beyond the measured categories (for the headroom)",
                  "estimate": None, "measured": measured.peak_allocated - categories, "error_percent": None},
                 {"quantity": "GPU peak reserved (max_memory_reserved): the peak plus the caching allocator's slack",
                  "estimate": None, "measured": measured.peak_reserved, "error_percent": None}]
    return rows


def comparison_table(rows: list[dict]) -> str:
    lines = ["| quantity | estimate MiB | measured MiB | error |", "|---|---|---|---|"]
    for r in rows:
        error = "" if r["error_percent"] is None else f"{r['error_percent']:+.1f}%"
        estimate = "" if r["estimate"] is None else f"{r['estimate'] / MIB:.2f}"
        lines.append(f"| {r['quantity']} | {estimate} | {r['measured'] / MIB:.2f} | {error} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_estimates(estimates: list[MemoryEstimate], path: str, title: str) -> str | None:
    """Stacked bars of GPU GiB by category, one bar per estimate, the budget as a line; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(estimates) + 2), 5.5))
    x = range(len(estimates))
    bottom = [0.0] * len(estimates)
    for category in CATEGORIES:
        heights = [e.gpu[category] / GIB for e in estimates]
        ax.bar(x, heights, bottom=bottom, label=LABELS[category])
        bottom = [b + h for b, h in zip(bottom, heights)]
    budget = next((e.budget for e in estimates if e.budget is not None), None)
    if budget is not None:
        ax.axhline(budget / GIB, color="black", linestyle="--", linewidth=1, label=f"usable {budget / GIB:.1f} GiB")
    ax.set_xticks(list(x), [f"{e.model}\n{e.settings.describe()}" + ("\nckpt" if e.checkpointing else "")
                            for e in estimates], rotation=90, fontsize=7)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(estimates: list[MemoryEstimate], output_dir: str, stem: str, title: str) -> list[str]:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` in ``output_dir``; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    md = os.path.join(output_dir, f"{stem}.md")
    with open(md, "w") as f:
        f.write(f"{title}\n\n{estimate_table(estimates)}\n")
    written = [md, write_csv(estimate_rows(estimates), os.path.join(output_dir, f"{stem}.csv"))]
    png = plot_estimates(estimates, os.path.join(output_dir, f"{stem}.png"), title)
    return written + ([png] if png else [])


# --------------------------------------------------------------------------------------------------
# The command (launch/profile_memory.py)
# --------------------------------------------------------------------------------------------------


@dataclass
class ProfileRequest:
    """Arguments of launch/profile_memory.py; ``check()`` rejects bad ones before any slow work."""

    config: str = "lilt"
    overrides: list = dataclasses.field(default_factory=list)
    ds_config: str = "ds_configs/zero2.json"
    world_size: int | None = None
    micro_batch: int | None = None
    gpu_memory: str | None = None
    headroom: float = 0.1
    measure: bool = False
    output_dir: str | None = None
    probe_batch: int = 2

    def check(self) -> None:
        if self.gpu_memory is not None:
            parse_memory_size(self.gpu_memory)
        _check_headroom(self.headroom)
        for name in ("world_size", "micro_batch", "probe_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def run_profile(request: ProfileRequest) -> str:
    """Estimate (and with ``measure`` also measure) one config; writes the reports and returns the text to print."""
    from .config import load_config
    from .engine import load_ds_config, resolve_device_choices
    from .runtime import init_distributed, present_device, process_group_scope

    request.check()
    ds_raw = load_ds_config(request.ds_config)
    cfg = load_config(request.config, request.overrides)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    world_size = request.world_size or launched
    if request.measure and world_size != launched:
        raise ConfigError(f"--measure runs on the {launched} process(es) launched here, not --world-size {world_size}: "
                          f"start it with `deepspeed --num_gpus {world_size} launch/profile_memory.py ...`")
    explicit = ds_raw.get("train_micro_batch_size_per_gpu")
    micro_batch = request.micro_batch or (explicit if isinstance(explicit, int) else cfg.train.micro_batch_size)
    budget = usable_bytes(parse_memory_size(request.gpu_memory), request.headroom) if request.gpu_memory else None

    with process_group_scope() if request.measure else contextlib.nullcontext():
        if request.measure:  # binds this rank's device first: the estimate's activations are measured there
            init_distributed()
        device = present_device() if request.measure else GPU_TARGET  # whose "auto" ds_config choices
        memory = MemoryModel(cfg, ds_raw, world_size, probe_batch=request.probe_batch, device=device)
        rank = int(os.environ.get("RANK", "0")) if request.measure else None
        estimate = memory.estimate(micro_batch, budget, rank=rank)
        output_dir = request.output_dir or os.path.join("outputs", f"memory-{cfg.config_name}")
        name = os.path.splitext(os.path.basename(request.ds_config))[0]
        title = (f"{estimate.model}, {estimate.settings.describe()} ({name}), {world_size} GPU(s), micro batch "
                 f"{micro_batch}, {cfg.model.vision.name}/{cfg.model.text.name} at {cfg.model.image_size} px: "
                 f"GiB per GPU")
        per_sample = memory.activations.bytes_per_sample(memory.settings.zero3_linear) / MIB
        text = [title, "", estimate_table([estimate]), "",
                f"{str(memory.settings.dtype).replace('torch.', '')} weights and activations; activations measured "
                f"at batch {memory.activations.probe_batch} on {memory.activations.device}: "
                f"{per_sample:.2f} MiB per sample"]
        text += [f"ds_config choice: {note}" for note in resolve_device_choices(ds_raw, device, request.ds_config)[1]]
        if budget is not None:
            verdict = "fits" if estimate.fits else "does NOT fit"
            text.append(f"verdict: {verdict} in {request.gpu_memory} with {request.headroom:.0%} headroom "
                        f"({format_gib(budget)} GiB usable); largest micro batch that fits: "
                        f"{estimate.largest_micro_batch}")
        measured_rows = None
        if request.measure:
            measured = measure_training_memory(cfg, ds_raw, micro_batch, request.ds_config)
            measured_rows = comparison_rows(estimate, measured)
            text += ["", f"measured on {measured.device} (rank {rank} of {measured.world_size}), two DeepSpeed steps:",
                     "", comparison_table(measured_rows)]
    if rank not in (None, 0):
        return ""
    written = write_report([estimate], output_dir, "estimate", title)
    if measured_rows:
        with open(os.path.join(output_dir, "measured.md"), "w") as f:
            f.write(comparison_table(measured_rows) + "\n")
        written += [os.path.join(output_dir, "measured.md"),
                    write_csv(measured_rows, os.path.join(output_dir, "measured.csv"))]
    if not any(p.endswith(".png") for p in written):
        text.append("no PNG chart: matplotlib is missing (pip install -e .[plot])")
    text += ["", "written: " + ", ".join(written)]
    return "\n".join(text)
