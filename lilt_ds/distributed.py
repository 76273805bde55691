"""Small torch.distributed helpers that also work in a plain single process.

Every helper degrades to the identity when no process group is initialised (or the world has one
rank), so losses and tests run unchanged with and without a launcher.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
import torch.nn.functional as F


def is_distributed() -> bool:
    """True when a process group is initialised (the world may still have a single rank)."""
    return dist.is_available() and dist.is_initialized()


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default group; (0, 1) when no process group is initialised."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Every rank waits for the others; a no-op in one process without a group."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(value) -> list:
    """Every rank's picklable ``value`` in rank order (a collective: call it on every rank);
    ``[value]`` in one process without a group."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_rank_info(values: torch.Tensor) -> list[list[int]]:
    """Every rank's small 1-D int64 tensor ``values``, as Python lists in rank order.

    One tiny all_gather and one host sync; ``values`` must live on a device the backend can
    communicate on (CPU for gloo, the rank's GPU for NCCL). Blocks until every rank calls it.
    """
    values = values.reshape(-1).to(torch.int64)
    _, world_size = world_info()
    if world_size == 1:
        return [values.tolist()]
    every = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(every, values)
    return torch.stack(every).tolist()


def gather_sizes(local_size: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``local_size``, in rank order (see :func:`gather_rank_info`)."""
    return [row[0] for row in gather_rank_info(torch.tensor([local_size], device=device))]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, as a new tensor without autograd history."""
    total = tensor.detach().clone()
    if world_info()[1] > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def _differentiable_all_gather(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PyTorch's autograd-aware all_gather: backward sums every rank's gradient into its own shard.

    torch 2.14 marks ``torch.distributed.nn.functional.all_gather`` deprecated (in favour of the
    private ``_functional_collectives.all_gather_single``); it still works on gloo and NCCL, so the
    FutureWarning is silenced here rather than printed at every step.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        return dist_autograd.all_gather(tensor)


def all_gather_rows(tensor: torch.Tensor, sizes: list[int], with_grad: bool = True) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0) in rank order; ranks may hold different row counts.

    ``sizes`` is :func:`gather_sizes` of ``tensor.shape[0]``. Shorter shards are zero-padded to the
    longest one for the collective and trimmed afterwards.

    with_grad=True: the result is differentiable w.r.t. every rank's rows, and the backward pass
    delivers to each rank the SUM over ranks of the gradient its rows received (each rank's own
    gradient of its own loss, plus the other ranks' gradients w.r.t. its rows).
    with_grad=False: only this rank's own slot carries autograd history (the others are constants),
    as in OpenCLIP's ``gather_with_grad=False``.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return tensor
    if len(sizes) != world_size or sizes[rank] != tensor.shape[0]:
        raise ValueError(f"sizes {sizes} do not match world size {world_size} and local rows {tensor.shape[0]}")
    longest = max(sizes)
    padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, longest - tensor.shape[0]))
    if with_grad:
        shards = list(_differentiable_all_gather(padded))
    else:
        shards = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(shards, padded.detach().contiguous())
        shards[rank] = padded
    return torch.cat([shard[:size] for shard, size in zip(shards, sizes)])


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank died or stopped answering:
    torch's DistBackendError (NCCL), or the RuntimeError gloo raises (a peer's closed connection, a
    timed-out send or receive), which names gloo's sources."""
    if isinstance(error, dist.DistBackendError):
        return True
    return isinstance(error, RuntimeError) and "/gloo/" in str(error)
