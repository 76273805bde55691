"""Fused kernels (C++ from kernels/ for CPU tensors, Triton for CUDA tensors) with PyTorch reference fallbacks.

``FusedContrastiveLoss`` (``loss.type=fused``) and ``apply_frozen_recompute`` (``memory.frozen_recompute``).
"""

from .. import losses as _losses  # noqa: F401  (first: it registers loss.type=fused from .contrastive)
from .builder import KernelBuildError, select
from .contrastive import FusedContrastiveLoss, Kernels, fused_clip_loss_fn, kernels_for
from .recompute import apply_frozen_recompute

__all__ = ["FusedContrastiveLoss", "KernelBuildError", "Kernels", "apply_frozen_recompute", "fused_clip_loss_fn",
           "kernels_for", "select"]
