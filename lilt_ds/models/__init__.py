"""Towers, the DualEncoder and the parameter-efficient modes (docs/architecture.md, "Modes")."""

from .checks import check_model_config
from .dual_encoder import DualEncoder, build_model, encode_batch
from .efficient import UNLOCKS, Adapter
from .modes import LOCKED_TOWERS, MODES
from .recompute import apply_frozen_recompute
from .summary import format_summary, parameter_numel, trainable_summary
from .text import TEXT_PRESETS, TextTower, build_tokenizer
from .vision import VISION_PRESETS, VisionTower

__all__ = [
    "Adapter",
    "DualEncoder",
    "LOCKED_TOWERS",
    "MODES",
    "TEXT_PRESETS",
    "TextTower",
    "UNLOCKS",
    "VISION_PRESETS",
    "VisionTower",
    "apply_frozen_recompute",
    "build_model",
    "build_tokenizer",
    "encode_batch",
    "check_model_config",
    "format_summary",
    "parameter_numel",
    "trainable_summary",
]
