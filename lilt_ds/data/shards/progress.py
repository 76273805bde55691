"""Where training is in an epoch of tar shards, at shard granularity; resumable, and shared with
the DataLoader workers.

An epoch reads the shards in a seeded order, the same on every rank. A shard counts as consumed
once all its samples have reached the training loop; a resumed epoch reads the shards not yet
consumed, so the samples of a shard that was half read at the checkpoint are seen again. Consumed
shards are saved by their number in the shard list, so a run can resume on another number of
ranks or workers.

Ranks train in lockstep, so every rank yields the same number of batches: the samples left in
the epoch divided by (ranks x batch size). A rank whose shards hold fewer samples than that reads
them again, as DistributedSampler pads the last round; one whose shards hold more leaves the rest
for the next epoch's order.
"""

import multiprocessing

import numpy as np

from ...distributed import all_gather_objects
from ..errors import DataError
from ..sampler import check_rank
from .files import ShardFiles


class ShardProgress:
    """The training position in the shards: the sampler of the shard path (`TrainLoader` calls
    `record_batch` for every delivered batch and `finish_epoch` at the end).

    The epoch and the shards this pass over the epoch skips live in shared memory: persistent
    DataLoader workers keep the dataset object they started with, and read these when an epoch
    starts. What is consumed during the pass is recorded in the main process only."""

    def __init__(self, shards: ShardFiles, rank: int, world_size: int, batch_size: int, seed: int):
        check_rank(rank, world_size)
        self.shards = shards
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self._counts = np.asarray(shards.counts, dtype=np.int64)
        self._epoch = multiprocessing.RawValue("q", 0)
        self._skipped = multiprocessing.RawArray("B", len(shards.counts))  # shared with workers
        self._consumed = np.zeros(len(shards.counts), dtype=bool)  # main process only

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def num_samples(self) -> int:
        """Samples per rank in a whole epoch."""
        return self.shards.total // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """A new epoch starts from its beginning; the current one keeps its position."""
        if epoch != self.epoch:
            self._start(epoch, [])

    def start_pass(self) -> None:
        """A pass over the epoch starts (TrainLoader calls it): from the position last set, or
        from the beginning when the epoch was read to its end."""
        skipped = np.frombuffer(self._skipped, dtype=np.uint8)
        if skipped.all():
            skipped[:] = 0
        self._consumed[:] = skipped.astype(bool)

    def record_batch(self, batch: dict) -> None:
        """Record the shards a delivered batch completed (and remove them from the batch)."""
        self._consumed[batch.pop("shards_done")] = True

    def finish_epoch(self) -> None:
        """The epoch was read to its end (its state is now the start of the next one)."""
        self._consumed[:] = True
        np.frombuffer(self._skipped, dtype=np.uint8)[:] = 1

    def epoch_plan(self) -> tuple[int, np.ndarray]:
        """(epoch, the shard numbers this pass reads, in the epoch's order)."""
        epoch = self.epoch
        order = np.random.default_rng([self.seed % 2**64, epoch % 2**64]).permutation(len(self._counts))
        skipped = np.frombuffer(self._skipped, dtype=np.uint8).astype(bool)
        if skipped.all():  # read to its end: a new pass reads it again
            skipped[:] = False
        return epoch, order[~skipped[order]]

    def batches_left(self) -> int:
        """Batches every rank yields in this pass over the epoch."""
        _, shards = self.epoch_plan()
        return int(self._counts[shards].sum()) // (self.world_size * self.batch_size)

    def state_dict(self) -> dict:
        """`{"epoch", "consumed_shards"}` over all ranks, plus what `load_state_dict` checks. A
        collective when torch.distributed is initialised: call it on every rank (checkpoint
        saving does)."""
        consumed = self._consumed.copy()
        for numbers in all_gather_objects(np.flatnonzero(consumed).tolist()):
            consumed[numbers] = True
        epoch, numbers = self.epoch, np.flatnonzero(consumed).tolist()
        if consumed.all():
            epoch, numbers = epoch + 1, []
        return {
            "epoch": epoch,
            "consumed_shards": numbers,
            "num_shards": len(consumed),
            "shards_digest": self.shards.digest(),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if "consumed_shards" not in state:
            raise DataError(
                f"the data position {sorted(state)} was saved for data.train_files (a "
                "JSON index), this run reads data.train_shards; use the same data, or "
                "resume without the data state."
            )
        if state.get("shards_digest") != self.shards.digest():
            raise DataError(
                f"the data position was saved with other shards ({state.get('num_shards')} shards, "
                f"digest {state.get('shards_digest')}); this run has {len(self._counts)} (digest "
                f"{self.shards.digest()}). Use the same data.train_shards, or resume without the data state."
            )
        numbers = state["consumed_shards"]
        epoch = state.get("epoch")
        if not (isinstance(epoch, int) and epoch >= 0 and all(0 <= k < len(self._counts) for k in numbers)):
            raise DataError(f"shard position {state!r} is out of range for these shards.")
        self._start(epoch, numbers)

    def _start(self, epoch: int, consumed: list[int]) -> None:
        self._epoch.value = epoch
        skipped = np.frombuffer(self._skipped, dtype=np.uint8)
        skipped[:] = 0
        skipped[consumed] = 1
        self._consumed[:] = False
        self._consumed[consumed] = True
