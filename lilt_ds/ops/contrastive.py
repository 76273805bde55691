"""FusedContrastiveLoss: the chunked CLIP loss with its log-sum-exps in one fused C++/CUDA kernel.

Only the heavy part, lse_i = log sum_j exp(s * q_i . k_j) over the B x N similarities, is fused
(:class:`_FusedLogSumExp`); the positive logits s * q_i . k_(offset+i) are O(B d) and stay in
autograd. Gathering, the exact data-parallel scaling and the modes come unchanged from
:class:`~lilt_ds.losses.ChunkedContrastiveLoss`, which is also the fallback when the kernel is not
available (see :mod:`lilt_ds.ops.builder`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..losses import ChunkedContrastiveLoss, GatheredBatch
from .builder import select

DEFAULT_TILE = (256, 256)
"""(tile_rows, tile_cols) of the CPU kernel: a 256 KiB tile of dots stays in L2 (the fastest of the
shapes tried at N=16k, d=256; see benchmarks/kernels.py)."""


class _FusedClipLoss(torch.autograd.Function):
    """Summed symmetric InfoNCE whose two row log-sum-exps run in the kernel; saves inputs and lse only.

    Backward writes every gradient into the kernel's fresh outputs (the positives' terms are added
    in place), so beyond the five input gradients it allocates nothing of size N x d.
    """

    @staticmethod
    def forward(ctx, local_img, local_txt, all_img, all_txt, scale, offset: int, kernels, tiles):
        dtype = local_img.dtype
        li, lt, ai, at = (t.detach().float().contiguous() for t in (local_img, local_txt, all_img, all_txt))
        s = float(scale)
        rows = slice(offset, offset + li.shape[0])
        lse_img = kernels.lse_forward(li, at, s, *tiles)
        lse_txt = kernels.lse_forward(lt, ai, s, *tiles)
        positives = (li * at[rows]).sum() + (lt * ai[rows]).sum()
        ctx.save_for_backward(local_img, local_txt, all_img, all_txt, lse_img, lse_txt, positives)
        ctx.scale, ctx.offset, ctx.kernels, ctx.tiles = s, offset, kernels, tiles
        return ((lse_img.sum() + lse_txt.sum() - s * positives) / 2).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        local_img, local_txt, all_img, all_txt, lse_img, lse_txt, positives = ctx.saved_tensors
        li, lt, ai, at = (t.float().contiguous() for t in (local_img, local_txt, all_img, all_txt))
        s, rows, half = ctx.scale, slice(ctx.offset, ctx.offset + li.shape[0]), grad_loss.float() / 2
        g = half.expand(li.shape[0]).contiguous()
        d_li, d_at, ds_img = ctx.kernels.lse_backward(li, at, s, lse_img, g, *ctx.tiles)
        d_lt, d_ai, ds_txt = ctx.kernels.lse_backward(lt, ai, s, lse_txt, g, *ctx.tiles)
        minus = -(half * s)
        d_li.add_(at[rows] * minus)
        d_lt.add_(ai[rows] * minus)
        d_at[rows].add_(li * minus)
        d_ai[rows].add_(lt * minus)
        d_scale = ds_img + ds_txt - half * positives
        return (d_li.to(local_img.dtype), d_lt.to(local_txt.dtype), d_ai.to(all_img.dtype), d_at.to(all_txt.dtype),
                d_scale.reshape(()), None, None, None)


def fused_clip_loss_fn(local_img, local_txt, all_img, all_txt, scale, offset: int, kernels,
                       tile_rows: int = DEFAULT_TILE[0], tile_cols: int = DEFAULT_TILE[1]) -> torch.Tensor:
    """Same value and gradients as :func:`lilt_ds.losses.chunked_clip_loss_fn`, computed by ``kernels``.

    Summed symmetric InfoNCE of the B local rows against the N gathered rows (local rows at
    offset..offset+B-1 of the gathered tensors), in float32 at least.
    """
    if not 0 <= offset <= all_img.shape[0] - local_img.shape[0]:
        raise ValueError(
            f"offset {offset} puts {local_img.shape[0]} local rows outside {all_img.shape[0]} gathered rows"
        )
    loss = _FusedClipLoss.apply(local_img, local_txt, all_img, all_txt, scale.reshape(()).float(), offset, kernels,
                                (tile_rows, tile_cols))
    return loss.to(local_img.dtype)


class FusedContrastiveLoss(ChunkedContrastiveLoss):
    """Drop-in for :class:`ChunkedContrastiveLoss` (``loss.type=fused``): same options, value, gradients.

    The row log-sum-exps run in the fused kernel (tiles of tile_rows x tile_cols dot products, no
    B x N logits, memory O((B + N) d)). Where the kernel is unavailable, or for float64 inputs, the
    chunked reference runs instead; ``implementation`` says which (decided once per process).
    """

    def __init__(self, chunk_size: int = 4096, local_loss: bool = True, gather_with_grad: bool = True,
                 tile_rows: int = DEFAULT_TILE[0], tile_cols: int = DEFAULT_TILE[1]):
        super().__init__(chunk_size=chunk_size, local_loss=local_loss, gather_with_grad=gather_with_grad)
        if tile_rows < 1 or tile_cols < 1:
            raise ValueError(f"tile_rows and tile_cols must be >= 1, got {tile_rows}, {tile_cols}")
        self.tile_rows, self.tile_cols = tile_rows, tile_cols
        self.selection = select("contrastive")

    @property
    def implementation(self) -> str:
        return "fused" if self.selection.fused else "reference"

    def summed_loss(self, batch: GatheredBatch, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.selection.fused or batch.local_img.dtype == torch.float64:
            return super().summed_loss(batch, scale, bias)
        if self.local_loss:
            rows_img, rows_txt, offset = batch.local_img, batch.local_txt, batch.offset
        else:
            rows_img, rows_txt, offset = batch.all_img, batch.all_txt, 0
        return fused_clip_loss_fn(rows_img, rows_txt, batch.all_img, batch.all_txt, scale, offset,
                                  self.selection.module, self.tile_rows, self.tile_cols)
