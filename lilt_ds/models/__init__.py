"""Towers, the DualEncoder and the parameter-efficient modes (see DESIGN.md's mode table)."""

from .dual_encoder import DualEncoder, build_model
from .efficient import UNLOCKS, Adapter
from .summary import format_summary, trainable_summary
from .text import TEXT_PRESETS, TextTower, build_tokenizer
from .vision import VISION_PRESETS, VisionTower

__all__ = [
    "Adapter", "DualEncoder", "TEXT_PRESETS", "TextTower", "UNLOCKS", "VISION_PRESETS", "VisionTower",
    "build_model", "build_tokenizer", "format_summary", "trainable_summary",
]
