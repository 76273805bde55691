"""Sharding the training set across ranks, reshuffled every epoch, resumable mid-epoch.

An epoch is one seeded permutation of the dataset, read cyclically (positions past its end wrap
around to its start, which pads the last round so every rank gets the same count). The ranks
take turns along it: rank r gets positions p + r, p + r + W, ... from the epoch's global
position p. At p = 0 this shards and pads as torch's DistributedSampler does (with shuffle=False,
in the very same order). Resuming restarts from the saved global position, which also works
when the number of ranks changed (a universal checkpoint).
"""

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from .errors import DataError


def check_rank(rank: int, world_size: int) -> None:
    """Both samplers (index and shards) take a rank of a world; refuse one that is not in it."""
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank!r} / world size {world_size!r}: expected 0 <= rank < world size.")


class ResumableDistributedSampler(Sampler):
    """Yields `(epoch, index)` pairs, this rank's share of the epoch from the current position.

    The loader that delivers the batches reports them with `advance(n)` (TrainLoader does), so
    `state_dict()` is what the training loop actually consumed, not what workers prefetched.
    `set_epoch(e)` with a new epoch starts it from the beginning; with the current epoch it keeps
    the position, so a resumed run can call `set_epoch` as usual."""

    def __init__(
        self,
        dataset_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        check_rank(rank, world_size)
        if dataset_size < (world_size if drop_last else 1):
            raise DataError(f"the dataset has {dataset_size} entries, too few for {world_size} ranks.")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # samples consumed in this epoch, over all ranks

    @property
    def num_samples(self) -> int:
        """Samples per rank in a whole epoch."""
        return self._count_from(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def advance(self, samples_per_rank: int) -> None:
        """Record that every rank consumed `samples_per_rank` more samples."""
        self.position += samples_per_rank * self.world_size

    def record_batch(self, batch) -> None:
        """Record a batch the training loop received (TrainLoader calls it)."""
        self.advance(len(batch["index"]))

    def finish_epoch(self) -> None:
        """Record that the epoch was read to its end (a drop_last remainder included)."""
        self.position = max(self.position, self.dataset_size)

    def epoch_order(self) -> np.ndarray:
        """The whole epoch's order of dataset indices, the same on every rank."""
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed % 2**64, self.epoch % 2**64]).permutation(self.dataset_size)

    def shard(self) -> np.ndarray:
        """This rank's remaining indices of the current epoch, in order."""
        start = self._start()
        positions = start + self.rank + self.world_size * np.arange(self._count_from(start))
        return self.epoch_order()[positions % self.dataset_size]

    def start_pass(self) -> None:
        """A pass over the epoch starts: from the saved position, or from the beginning when the
        epoch was read to its end."""
        self.position = self._start()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.start_pass()
        epoch, shard = self.epoch, self.shard()
        return ((epoch, int(i)) for i in shard)

    def __len__(self) -> int:
        return self._count_from(self._start())

    def state_dict(self) -> dict[str, int]:
        """`{"epoch", "consumed"}` (consumed: samples this rank has consumed in the epoch), plus what
        `load_state_dict` needs to check and to resume on another world size. A finished epoch is
        saved as the start of the next one."""
        epoch, position = self.epoch, self.position
        if self._count_from(position) == 0:
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch,
            "consumed": position // self.world_size,
            "global_consumed": position,
            "world_size": self.world_size,
            "dataset_size": self.dataset_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "consumed"} - set(state)
        if "consumed_shards" in state:
            raise DataError(
                "the data position was saved for data.train_shards, this run reads "
                "data.train_files; use the same data, or resume without the data state."
            )
        if missing:
            raise DataError(
                f"sampler state {state!r} lacks {sorted(missing)}; pass what "
                "ResumableDistributedSampler.state_dict() returned."
            )
        saved_size = state.get("dataset_size", self.dataset_size)
        if saved_size != self.dataset_size:
            raise DataError(
                f"the data position was saved with a dataset of {saved_size} entries, this run has "
                f"{self.dataset_size}: the epoch order differs, so the rest of the epoch cannot be "
                "replayed. Use the same data.train_files, or resume without the data state."
            )
        position = state.get("global_consumed", state["consumed"] * state.get("world_size", self.world_size))
        in_range = 0 <= position <= self.dataset_size + self.world_size
        if not (isinstance(state["epoch"], int) and state["epoch"] >= 0 and in_range):
            raise DataError(f"sampler state {state!r} is out of range for this dataset.")
        self.epoch = state["epoch"]
        self.position = position

    def _start(self) -> int:
        # An epoch read to its end is read again from its start, as DistributedSampler does
        # when set_epoch is not called.
        return self.position if self._count_from(self.position) > 0 else 0

    def _count_from(self, position: int) -> int:
        remaining = max(0, self.dataset_size - position)
        return remaining // self.world_size if self.drop_last else math.ceil(remaining / self.world_size)
