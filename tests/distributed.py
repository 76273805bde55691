"""Run a function on N gloo ranks in real processes (torch.multiprocessing), results via files."""

import json
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from lilt_ds.runtime import free_port


def _entry(rank, fn, world_size, port, out_dir, args):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    result = fn(rank, world_size, *args)
    if dist.is_initialized():  # left to interpreter exit, gloo's threads can abort the rank
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def run_ranks(fn, world_size: int, out_dir, *args) -> list:
    """``fn(rank, world_size, *args)`` on every rank; returns each rank's JSON-able result."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), str(out_dir), args), nprocs=world_size, join=True)
    results = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results
