"""Per-rank memory of a training run: estimated before renting GPUs (:mod:`.estimate`), measured
after (:mod:`.measure`), with the saved-tensor meter both use (:mod:`.saved_tensors`). Tables,
charts behind the profile_memory command (lilt_ds.cli.profile_memory) live in :mod:`lilt_ds.tools.memory_report`."""

from .estimate import (
    CATEGORIES,
    GIB,
    LABELS,
    MIB,
    MODEL_STATES,
    ActivationProfile,
    EngineSettings,
    MemoryEstimate,
    MemoryModel,
    ParameterInventory,
    activation_device,
    describe_model,
    format_gib,
    loss_buffer_bytes,
    model_state_bytes,
    parse_memory_size,
    profile_activations,
    usable_bytes,
    uses_checkpointing,
)
from .measure import Measurement, engine_state_bytes, measure_training_memory
from .saved_tensors import SavedTensorMeter

__all__ = [
    "ActivationProfile",
    "CATEGORIES",
    "EngineSettings",
    "GIB",
    "LABELS",
    "MIB",
    "MODEL_STATES",
    "Measurement",
    "MemoryEstimate",
    "MemoryModel",
    "ParameterInventory",
    "SavedTensorMeter",
    "activation_device",
    "describe_model",
    "engine_state_bytes",
    "format_gib",
    "loss_buffer_bytes",
    "measure_training_memory",
    "model_state_bytes",
    "parse_memory_size",
    "profile_activations",
    "usable_bytes",
    "uses_checkpointing",
]
