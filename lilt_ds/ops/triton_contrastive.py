"""The fused log-sum-exp of scaled similarities in Triton: the GPU kernel of ``loss.type=fused``.

For queries Q [B, d], keys K [N, d] and a scale s (a 0-d tensor on the device, read by the kernel:
no host sync), forward gives lse_i = log sum_j exp(s q_i . k_j); backward, with
P_ij = exp(s q_i . k_j - lse_i) and row weights g_i, gives dQ_i = s g_i sum_j P_ij k_j,
dK_j = s sum_i g_i P_ij q_i and ds = sum_ij g_i P_ij q_i . k_j. The B x N logits never exist:
tiles of ``tl.dot`` products are recomputed where needed.

- Forward: an online log-sum-exp over column tiles per row tile. The columns may be split among
  several programs (``splits``), each keeping its own partial log-sum-exp, merged afterwards by
  torch: local mode has few row tiles (B = N / world size), and the splits keep the GPU full.
- Backward, two passes and no atomics (each output element is written by one program, in a fixed
  order: deterministic): row tiles give dQ and the scale gradient (columns split as in forward,
  partial dQs summed by torch), column tiles give dK. Each program accumulates ``width`` columns
  of d; wider d runs more programs, each recomputing the dot products.

fp32 inputs use ``input_precision="ieee"`` (TF32 gives errors near 1e-2 in lse at scale 100);
bf16/fp16 inputs multiply on tensor cores with fp32 accumulation (under the interpreter bf16 tiles
are raised to fp32 first: it multiplies bf16 wrongly). Written for the GPU compiler's
limits: every ``tl.dot`` side is a power of two >= 16, accumulators at most 128 x 128 floats.
Triton's interpreter (``TRITON_INTERPRET=1``, set before this module is imported) runs it on CPU
tensors for the tests; it cannot show races, register spills or shared-memory limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)
"""Whether the kernels below were made for Triton's interpreter (CPU tensors) or the GPU compiler."""

DEFAULT_TILES = (64, 64)
MIN_TILE, MAX_TILE = 16, 128
DEPTH = 32  # columns of d per tl.dot when computing a tile of dot products
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _tile_dots(
    q_ptr,
    k_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_q,
    stride_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The [BLOCK_M, BLOCK_N] dot products q_rows . k_cols in fp32, over d in chunks of BLOCK_K."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        depth = k0 + tl.arange(0, BLOCK_K)
        depth_mask = depth < D
        q = tl.load(
            q_ptr + rows[:, None] * stride_q + depth[None, :], mask=row_mask[:, None] & depth_mask[None, :], other=0.0
        ).to(OPERAND)
        k = tl.load(
            k_ptr + cols[:, None] * stride_k + depth[None, :], mask=col_mask[:, None] & depth_mask[None, :], other=0.0
        ).to(OPERAND)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _weighted_probs(dots, scale, lse, g, row_mask, col_mask):
    """g_i P_ij on the tile, zero outside the matrix."""
    p = tl.exp(dots * scale - lse[:, None]) * g[:, None]
    return tl.where(row_mask[:, None] & col_mask[None, :], p, 0.0)


@triton.jit
def _lse_forward_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    out_ptr,
    B,
    N,
    D,
    stride_q,
    stride_k,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (row tile, split): the log-sum-exp of its rows over its split's columns, to out[split, rows]."""
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    scale = tl.load(scale_ptr).to(tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    first = split * cols_per_split
    last = tl.minimum(first + cols_per_split, N)
    for n0 in range(first, last, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < last
        logits = (
            _tile_dots(
                q_ptr,
                k_ptr,
                rows,
                cols,
                row_mask,
                col_mask,
                D,
                stride_q,
                stride_k,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                OPERAND,
                PRECISION,
            )
            * scale
        )
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(out_ptr + split * B + rows, run_max + tl.log(run_sum), mask=row_mask)


@triton.jit
def _lse_backward_rows_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    lse_ptr,
    g_ptr,
    dq_ptr,
    ds_ptr,
    B,
    N,
    D,
    stride_q,
    stride_k,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (row tile, d block, split): its split's share of dQ[rows, d block] (to dq[split]) and,
    in d block 0, of the scale gradient per row (to ds[split, rows])."""
    pid_m, pid_d, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    width = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    width_mask = width < D
    scale = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first = split * cols_per_split
    last = tl.minimum(first + cols_per_split, N)
    for n0 in range(first, last, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < last
        dots = _tile_dots(
            q_ptr,
            k_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_q,
            stride_k,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            OPERAND,
            PRECISION,
        )
        p = _weighted_probs(dots, scale, lse, g, row_mask, col_mask)
        ds += tl.sum(p * dots, axis=1)
        k = tl.load(
            k_ptr + cols[:, None] * stride_k + width[None, :], mask=col_mask[:, None] & width_mask[None, :], other=0.0
        ).to(OPERAND)
        dq = tl.dot(p.to(OPERAND), k, dq, input_precision=PRECISION)
    tl.store(
        dq_ptr + (split * B + rows[:, None]) * D + width[None, :],
        dq * scale,
        mask=row_mask[:, None] & width_mask[None, :],
    )
    tl.store(ds_ptr + split * B + rows, ds, mask=row_mask & (pid_d == 0))


@triton.jit
def _lse_backward_cols_kernel(
    q_ptr,
    k_ptr,
    scale_ptr,
    lse_ptr,
    g_ptr,
    dk_ptr,
    B,
    N,
    D,
    stride_q,
    stride_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (column tile, d block): dK[cols, d block] over every row tile."""
    pid_n, pid_d = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    width = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    width_mask = width < D
    scale = tl.load(scale_ptr).to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        dots = _tile_dots(
            q_ptr,
            k_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            stride_q,
            stride_k,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            OPERAND,
            PRECISION,
        )
        p = _weighted_probs(dots, scale, lse, g, row_mask, col_mask)
        q = tl.load(
            q_ptr + rows[:, None] * stride_q + width[None, :], mask=row_mask[:, None] & width_mask[None, :], other=0.0
        ).to(OPERAND)
        dk = tl.dot(tl.trans(p.to(OPERAND)), q, dk, input_precision=PRECISION)
    tl.store(dk_ptr + cols[:, None] * D + width[None, :], dk * scale, mask=col_mask[:, None] & width_mask[None, :])


# ---------------------------------------------------------------------------------- the Python side
def _power_of_two_tile(value: int | None, default: int) -> int:
    """loss.tile_rows / tile_cols for Triton: a power of two in [16, 128] (tl.arange and tl.dot need it)."""
    value = default if value is None else int(value)
    return min(MAX_TILE, max(MIN_TILE, 1 << max(0, math.ceil(math.log2(max(value, 1))))))


@dataclass(frozen=True)
class Launch:
    """Tile shape and grid of one problem: rows x cols tiles of dot products, ``width`` columns of d
    per accumulator, the forward and dQ columns split ``splits`` ways."""

    rows: int
    cols: int
    width: int
    splits: int

    @classmethod
    def plan(
        cls, B: int, N: int, D: int, tiles=(None, None), splits: int | None = None, device: torch.device | None = None
    ) -> Launch:
        rows = _power_of_two_tile(tiles[0], DEFAULT_TILES[0])
        cols = _power_of_two_tile(tiles[1], DEFAULT_TILES[1])
        width = min(MAX_TILE, max(MIN_TILE, triton.next_power_of_2(D)))
        col_tiles = triton.cdiv(N, cols)
        if splits is None:  # about four programs per multiprocessor, each with >= 4 column tiles
            units = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device is not None and device.type == "cuda"
                else 1
            )
            wanted = triton.cdiv(4 * units, triton.cdiv(B, rows) * triton.cdiv(D, width))
            splits = max(1, min(wanted, col_tiles // 4))
        per_split = triton.cdiv(col_tiles, max(1, min(int(splits), col_tiles)))
        return cls(rows, cols, width, triton.cdiv(col_tiles, per_split))  # no split left without columns

    def cols_per_split(self, N: int) -> int:
        """Columns of each split, a whole number of column tiles (the last split may hold fewer)."""
        return triton.cdiv(triton.cdiv(N, self.cols), self.splits) * self.cols


def _operands(dtype: torch.dtype) -> dict:
    """The tl.dot operand type and precision for inputs of ``dtype``. Triton's interpreter multiplies
    bf16 operands wrongly (NumPy has no bf16): there bf16 tiles are raised to fp32 first."""
    operand = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    if INTERPRETED and dtype == torch.bfloat16:
        operand = tl.float32
    return {"OPERAND": operand, "PRECISION": "ieee" if operand == tl.float32 else "tf32"}  # ignored for 16-bit


def _prepare(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor):
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1] or q.device != k.device:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must be [B, d] and [N, d] on one device")
    dtype = q.dtype if q.dtype in INPUT_DTYPES and k.dtype == q.dtype else torch.float32
    return (
        q.to(dtype).contiguous(),
        k.to(dtype).contiguous(),
        scale.detach().reshape(1).to(device=q.device, dtype=torch.float32),
    )


def lse_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, tiles=(None, None), splits: int | None = None
) -> torch.Tensor:
    """lse_i = log sum_j exp(scale * q_i . k_j), fp32 [B]."""
    q, k, scale = _prepare(q, k, scale)
    (B, D), N = q.shape, k.shape[0]
    launch = Launch.plan(B, N, D, tiles, splits, q.device)
    partial = torch.empty(launch.splits, B, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(B, launch.rows), launch.splits)
    _lse_forward_kernel[grid](
        q,
        k,
        scale,
        partial,
        B,
        N,
        D,
        q.stride(0),
        k.stride(0),
        launch.cols_per_split(N),
        BLOCK_M=launch.rows,
        BLOCK_N=launch.cols,
        BLOCK_K=DEPTH,
        **_operands(q.dtype),
    )
    return partial[0] if launch.splits == 1 else torch.logsumexp(partial, dim=0)


def lse_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    tiles=(None, None),
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, ds) of sum_i g_i lse_i, fp32; ds is a 0-d tensor on the device."""
    q, k, scale = _prepare(q, k, scale)
    (B, D), N = q.shape, k.shape[0]
    lse, g = lse.float().contiguous(), g.float().contiguous()
    launch = Launch.plan(B, N, D, tiles, splits, q.device)
    meta = dict(BLOCK_M=launch.rows, BLOCK_N=launch.cols, BLOCK_K=DEPTH, BLOCK_D=launch.width, **_operands(q.dtype))
    dq = torch.empty(launch.splits, B, D, device=q.device, dtype=torch.float32)
    ds = torch.empty(launch.splits, B, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(B, launch.rows), triton.cdiv(D, launch.width), launch.splits)
    _lse_backward_rows_kernel[grid](
        q, k, scale, lse, g, dq, ds, B, N, D, q.stride(0), k.stride(0), launch.cols_per_split(N), **meta
    )
    dk = torch.empty(N, D, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N, launch.cols), triton.cdiv(D, launch.width))
    _lse_backward_cols_kernel[grid](q, k, scale, lse, g, dk, B, N, D, q.stride(0), k.stride(0), **meta)
    dq = dq[0] if launch.splits == 1 else dq.sum(dim=0)
    return dq, dk, ds.sum()
