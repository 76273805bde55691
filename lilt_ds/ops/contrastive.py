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

DEFAULT_TILE = (64, 512)
"""(tile_rows, tile_cols) of the CPU kernel: a 128 KiB tile of dots stays in L2."""


class _FusedLogSumExp(torch.autograd.Function):
    """lse = log sum_j exp(scale * queries @ keys.T) per row; saves the inputs and lse only."""

    @staticmethod
    def forward(ctx, queries, keys, scale, kernels, tile_rows: int, tile_cols: int):
        q, k = queries.float().contiguous(), keys.float().contiguous()
        lse = kernels.lse_forward(q, k, float(scale), tile_rows, tile_cols)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.kernels, ctx.tiles = kernels, (tile_rows, tile_cols)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse):
        queries, keys, scale, lse = ctx.saved_tensors
        q, k = queries.float().contiguous(), keys.float().contiguous()
        grad_q, grad_k, grad_scale = ctx.kernels.lse_backward(
            q, k, float(scale), lse, grad_lse.float().contiguous(), *ctx.tiles
        )
        return (grad_q.to(queries.dtype), grad_k.to(keys.dtype), grad_scale.reshape(scale.shape).to(scale.dtype),
                None, None, None)


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
    s = scale.reshape(()).float()
    rows = slice(offset, offset + local_img.shape[0])
    lse_img = _FusedLogSumExp.apply(local_img, all_txt, s, kernels, tile_rows, tile_cols)
    lse_txt = _FusedLogSumExp.apply(local_txt, all_img, s, kernels, tile_rows, tile_cols)
    positives = (local_img.float() * all_txt[rows].float()).sum() + (local_txt.float() * all_img[rows].float()).sum()
    loss = (lse_img.sum() + lse_txt.sum() - s * positives) / 2
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
