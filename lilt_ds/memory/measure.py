"""Per-rank memory of a real training step: what a DeepSpeed engine holds, category by category.

Two real steps on random data: the engine's tensors (parameters, gradients, fp32 masters, optimizer
states, buckets, read from its attributes) at their peak during the backward pass, the bytes
autograd saved in the forward and the loss, and on a GPU the allocator's peak: so every estimate of
:mod:`lilt_ds.memory.estimate` can be checked against a measurement.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from .. import engine as ds_engine
from ..data.synthetic import random_batch
from ..ds_compat import is_persistent, zero3_partition
from ..engine import torch_linear
from ..losses import as_fp32, build_loss
from ..models import build_model
from ..runtime import init_distributed
from ..schema import replace_keys
from .estimate import MODEL_STATES
from .saved_tensors import SavedTensorMeter


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
    (("ipg",), "buckets"),  # ipg_buckets: gradient reduce buckets
    (("norm", "overflow", "inf_or_nan"), "other"),  # scalars: _global_grad_norm, flags
    (("grad",), "gradients"),  # averaged_gradients, grad_partitions_flat_buffer
    (("fp32",), "master_weights"),  # single_partition_of_fp32_groups, ...
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
        partition = zero3_partition(p)
        ledger.claim(partition, weights)
        ledger.claim(p.data, weights if partition is None or is_persistent(p) else "buckets")
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
    rank, world_size, _ = init_distributed()
    with torch_linear():  # ZeRO-3 replaces F.linear for the rest of the process: undo it after
        return _measure(cfg, ds_config, micro_batch, ds_name, world_size)


def _measure(cfg, ds_config: dict, micro_batch: int, ds_name: str, world_size: int) -> Measurement:
    from deepspeed.accelerator import get_accelerator

    cfg = replace_keys(cfg, {"train.micro_batch_size": micro_batch, "train.grad_accum_steps": 1})
    ds = ds_engine.resolve_ds_config(ds_config, cfg, world_size, total_steps=2, ds_name=ds_name)
    dtype = ds_engine.engine_dtype(ds)
    torch.manual_seed(cfg.seed)
    engine, _, _ = ds_engine.initialize(build_model(cfg, load_weights=False), ds, cfg, total_steps=2)
    loss_fn = build_loss(cfg.loss)
    batch = tuple(
        random_batch(
            cfg,
            micro_batch,
            dtype=dtype,
            device=engine.device,
            length=getattr(engine.module.text, "context_length", None),
        ).values()
    )
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
