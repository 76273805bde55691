"""FusedContrastiveLoss: the chunked CLIP loss with its log-sum-exps in one fused kernel.

Only the heavy part, lse_i = log sum_j exp(s * q_i . k_j) over the B x N similarities, is fused
(:class:`_FusedClipLoss`): the C++ kernel for CPU tensors, the Triton kernel for CUDA tensors (see
:mod:`lilt_ds.ops.builder`). The positive logits s * q_i . k_(offset+i) are O(B d) and stay in
autograd. Gathering, the exact data-parallel scaling and the modes come unchanged from
:class:`~lilt_ds.losses.ChunkedContrastiveLoss`, which is also the fallback where no kernel is
available.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..losses import ChunkedContrastiveLoss, GatheredBatch
from .builder import Selection, select

DEFAULT_TILE = (256, 256)
"""(tile_rows, tile_cols) of the CPU kernel: a 256 KiB tile of dots stays in L2 (the fastest of the
shapes tried at N=16k, d=256; see benchmarks/loss_kernels.py). The Triton kernel has its own default."""


class Kernels:
    """One interface over the selected kernels: ``lse_forward(q, k, scale, tiles)`` and
    ``lse_backward(q, k, scale, lse, g, tiles) -> (dq, dk, ds)``, the scale a 0-d tensor.

    The C++ kernel takes fp32 rows and the scale as a number (read from a CPU tensor: no device
    sync); the Triton kernel takes fp32 or 16-bit rows and reads the scale on the device.
    """

    def __init__(self, selection: Selection):
        self.selection, self.module = selection, selection.module
        self.triton = selection.kind == "triton"

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        keep = self.triton and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return (t.detach() if keep else t.detach().float()).contiguous()

    def _tiles(self, tiles):
        return tiles if self.triton else tuple(d if t is None else t for t, d in zip(tiles, DEFAULT_TILE))

    def lse_forward(self, q, k, scale, tiles):
        if self.triton:
            return self.module.lse_forward(q, k, scale, tiles)
        return self.module.lse_forward(q, k, float(scale), *self._tiles(tiles))

    def lse_backward(self, q, k, scale, lse, g, tiles):
        if self.triton:
            return self.module.lse_backward(q, k, scale, lse, g, tiles)
        return tuple(self.module.lse_backward(q, k, float(scale), lse, g, *self._tiles(tiles)))


class _FusedClipLoss(torch.autograd.Function):
    """Summed symmetric InfoNCE whose two row log-sum-exps run in the kernel; saves inputs and lse only.

    Backward adds the positives' terms into the kernel's fresh fp32 outputs in place, so beyond the
    five input gradients it allocates nothing of size N x d. No host sync: the scale stays a tensor.
    """

    @staticmethod
    def forward(ctx, local_img, local_txt, all_img, all_txt, scale, offset: int, kernels: Kernels, tiles):
        dtype = local_img.dtype
        li, lt, ai, at = (kernels.rows(t) for t in (local_img, local_txt, all_img, all_txt))
        s = scale.detach().float()
        rows = slice(offset, offset + li.shape[0])
        lse_img = kernels.lse_forward(li, at, s, tiles)
        lse_txt = kernels.lse_forward(lt, ai, s, tiles)
        positives = (li.float() * at[rows].float()).sum() + (lt.float() * ai[rows].float()).sum()
        ctx.save_for_backward(local_img, local_txt, all_img, all_txt, s, lse_img, lse_txt, positives)
        ctx.offset, ctx.kernels, ctx.tiles = offset, kernels, tiles
        return ((lse_img.sum() + lse_txt.sum() - s * positives) / 2).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        local_img, local_txt, all_img, all_txt, s, lse_img, lse_txt, positives = ctx.saved_tensors
        kernels = ctx.kernels
        li, lt, ai, at = (kernels.rows(t) for t in (local_img, local_txt, all_img, all_txt))
        rows, half = slice(ctx.offset, ctx.offset + li.shape[0]), grad_loss.float() / 2
        g = half.expand(li.shape[0]).contiguous()
        d_li, d_at, ds_img = kernels.lse_backward(li, at, s, lse_img, g, ctx.tiles)
        d_lt, d_ai, ds_txt = kernels.lse_backward(lt, ai, s, lse_txt, g, ctx.tiles)
        minus = -(half * s)
        d_li.add_(at[rows].float() * minus)
        d_lt.add_(ai[rows].float() * minus)
        d_at[rows].add_(li.float() * minus)
        d_ai[rows].add_(lt.float() * minus)
        d_scale = ds_img + ds_txt - half * positives
        return (
            d_li.to(local_img.dtype),
            d_lt.to(local_txt.dtype),
            d_ai.to(all_img.dtype),
            d_at.to(all_txt.dtype),
            d_scale.reshape(()),
            None,
            None,
            None,
        )


def fused_clip_loss_fn(
    local_img,
    local_txt,
    all_img,
    all_txt,
    scale,
    offset: int,
    kernels: Kernels,
    tile_rows: int | None = None,
    tile_cols: int | None = None,
) -> torch.Tensor:
    """Same value and gradients as :func:`lilt_ds.losses.chunked_clip_loss_fn`, computed by ``kernels``.

    Summed symmetric InfoNCE of the B local rows against the N gathered rows (local rows at
    offset..offset+B-1 of the gathered tensors), accumulated in float32. Tiles: None = the kernel's default.
    """
    if not 0 <= offset <= all_img.shape[0] - local_img.shape[0]:
        raise ValueError(
            f"offset {offset} puts {local_img.shape[0]} local rows outside {all_img.shape[0]} gathered rows"
        )
    loss = _FusedClipLoss.apply(
        local_img, local_txt, all_img, all_txt, scale.reshape(()), offset, kernels, (tile_rows, tile_cols)
    )
    return loss.to(local_img.dtype)


def kernels_for(device: torch.device | str) -> Kernels | None:
    """The fused kernels for tensors on ``device`` (None: the reference runs there)."""
    selection = select("contrastive", torch.device(device).type)
    return Kernels(selection) if selection.fused else None


class FusedContrastiveLoss(ChunkedContrastiveLoss):
    """Drop-in for :class:`ChunkedContrastiveLoss` (``loss.type=fused``): same options, value, gradients.

    The row log-sum-exps run in the fused kernel of the features' device (tiles of tile_rows x
    tile_cols dot products, no B x N logits, memory O((B + N) d)). Where no kernel is available,
    or for float64 inputs, the chunked reference runs instead; :meth:`implementation` says which
    (decided once per process and device type; the constructor decides it for this process's device).
    """

    def __init__(
        self,
        chunk_size: int = 4096,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        tile_rows: int | None = None,
        tile_cols: int | None = None,
    ):
        super().__init__(chunk_size=chunk_size, local_loss=local_loss, gather_with_grad=gather_with_grad)
        for name, value in (("tile_rows", tile_rows), ("tile_cols", tile_cols)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (the kernel's default), got {value!r}")
        self.tile_rows, self.tile_cols = tile_rows, tile_cols
        kernels_for("cuda" if torch.cuda.is_available() else "cpu")  # build now, log the choice once

    @staticmethod
    def implementation(device: torch.device | str = "cpu") -> str:
        """``fused`` (C++), ``triton`` or ``reference``: what runs on tensors of ``device``."""
        return select("contrastive", torch.device(device).type).kind

    def summed_loss(self, batch: GatheredBatch, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernels = kernels_for(batch.local_img.device)
        if kernels is None or batch.local_img.dtype == torch.float64:
            return super().summed_loss(batch, scale, bias)
        if self.local_loss:
            rows_img, rows_txt, offset = batch.local_img, batch.local_txt, batch.offset
        else:
            rows_img, rows_txt, offset = batch.all_img, batch.all_txt, 0
        return fused_clip_loss_fn(
            rows_img, rows_txt, batch.all_img, batch.all_txt, scale, offset, kernels, self.tile_rows, self.tile_cols
        )
