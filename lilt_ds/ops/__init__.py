"""Fused kernels with PyTorch reference fallbacks: the contrastive loss's log-sum-exps in C++ (CPU
tensors, sources in kernels/) or Triton (CUDA tensors); ``FusedContrastiveLoss`` is ``loss.type=fused``."""

from .builder import KernelBuildError, select
from .contrastive import FusedContrastiveLoss, Kernels, fused_clip_loss_fn, kernels_for

__all__ = ["FusedContrastiveLoss", "KernelBuildError", "Kernels", "fused_clip_loss_fn", "kernels_for", "select"]
