"""Shards drawn with replacement (``data.resampled``, OpenCLIP's ``--dataset-resampled``), from one
source or a weighted mixture, as an endless stream cut into epochs of ``data.samples_per_epoch``.

Each rank reads ``lanes`` streams, one per DataLoader worker. Batch i of a rank (counted from the
start of training) comes from lane i mod lanes, so a worker serves the lane of the batches the
DataLoader asks it for, whichever epoch or pass it is in. A lane's stream is a sequence of blocks;
block b draws BLOCK_DRAWS shards from a generator seeded by (seed, rank, lane, b), reads them and
mixes their samples in a shuffle buffer seeded the same way. A lane's position is (block, samples
of the block consumed); each delivered batch carries it, the training process records it, and a
resumed run reads the block again from its start, skipping what was consumed (without decoding
it): the same samples follow as in an uninterrupted run. The weights are the sources' shares of
the samples drawn: a shard of source s is drawn with probability proportional to w_s / (samples
of source s), uniformly within its source.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
from collections.abc import Iterator

import numpy as np
from torch.utils.data import get_worker_info

from ...distributed import all_gather_objects
from ..bad_samples import BadSample
from ..errors import DataError
from ..sampler import check_rank
from .dataset import ShardDataset, shard_damage
from .files import ShardFiles, webdataset
from .sources import shard_samples

log = logging.getLogger("lilt_ds")

BLOCK_DRAWS = 4
"""Shards per block of a lane: what one shuffle buffer mixes, and at most what a resume reads again."""


def draw_probabilities(shards: ShardFiles) -> np.ndarray:
    """Each shard's probability of being drawn: its source's weight over the source's samples."""
    counts = np.asarray(shards.counts, dtype=np.float64)
    source = np.asarray([shards.source_of(k) for k in range(len(counts))])
    per_source = np.bincount(source, weights=counts, minlength=len(shards.weights))
    weights = np.asarray(shards.weights, dtype=np.float64)
    p = weights[source] / per_source[source]
    return p / p.sum()


class StreamProgress:
    """The position of one rank in its resampled stream: the sampler of ``ResampledShardDataset``
    (TrainLoader calls ``record_batch`` for every delivered batch). The epoch, the batches delivered
    in it and the lanes' positions live in shared memory, read by workers when a pass starts."""

    def __init__(
        self,
        shards: ShardFiles,
        samples_per_epoch: int,
        rank: int,
        world_size: int,
        batch_size: int,
        lanes: int,
        seed: int,
    ):
        check_rank(rank, world_size)
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.lanes, self.seed = batch_size, lanes, seed
        self.samples_per_epoch = samples_per_epoch
        self._epoch = multiprocessing.RawValue("q", 0)
        self._delivered = multiprocessing.RawValue("q", 0)  # batches of this epoch delivered
        self._positions = multiprocessing.RawArray("q", 2 * lanes)  # (block, consumed) per lane
        # what the workers of the next pass read, fixed when it starts: the live values above change
        # with every delivered batch while late workers may still be starting
        self._plan = multiprocessing.RawArray("q", 3 + 2 * lanes)  # epoch, batches before, batches left, lanes
        self._fix_plan()

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @property
    def num_samples(self) -> int:
        """Samples per rank in an epoch."""
        return self.samples_per_epoch // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def positions(self) -> np.ndarray:
        return np.frombuffer(self._positions, dtype=np.int64).reshape(self.lanes, 2)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._epoch.value, self._delivered.value = epoch, 0
        self._fix_plan()

    def start_pass(self) -> None:
        if self._delivered.value >= self.batches_per_epoch:  # read to its end: a new pass goes on streaming
            self._delivered.value = 0
        self._fix_plan()

    def _fix_plan(self) -> None:
        delivered = self._delivered.value
        if delivered >= self.batches_per_epoch:
            delivered = 0
        plan = np.frombuffer(self._plan, dtype=np.int64)
        plan[:3] = (self.epoch, self.epoch * self.batches_per_epoch + delivered, self.batches_per_epoch - delivered)
        plan[3:] = self.positions().reshape(-1)

    def record_batch(self, batch: dict) -> None:
        lane, block, consumed = batch.pop("stream_position")
        self.positions()[lane] = (block, consumed)
        self._delivered.value += 1

    def finish_epoch(self) -> None:
        self._delivered.value = self.batches_per_epoch

    def batches_left(self) -> int:
        return max(0, self.batches_per_epoch - self._delivered.value)

    def pass_plan(self) -> tuple[int, int, int, np.ndarray]:
        """(epoch, batches of training delivered before this pass, batches it yields, the lanes'
        positions), as fixed when the pass started."""
        plan = np.frombuffer(self._plan, dtype=np.int64).copy()
        return int(plan[0]), int(plan[1]), int(plan[2]), plan[3:].reshape(self.lanes, 2)

    def state_dict(self) -> dict:
        """Every rank's lanes (a collective when torch.distributed is initialised: call it on every rank)."""
        positions = all_gather_objects(self.positions().tolist())
        return {
            "resampled": True,
            "epoch": self.epoch,
            "delivered": self._delivered.value,
            "positions": positions,
            "lanes": self.lanes,
            "world_size": self.world_size,
            "shards_digest": self.shards.digest(),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state.get("resampled"):
            raise DataError(
                "the data position was saved for data.resampled=false (or a caption JSON); this run draws shards "
                "with replacement (data.resampled=true): use the same data settings, or resume without the data state."
            )
        if state.get("shards_digest") != self.shards.digest():
            raise DataError(
                f"the data position was saved with other shards or weights (digest {state.get('shards_digest')}); "
                f"this run has digest {self.shards.digest()}. Use the same data.train_shards."
            )
        self._epoch.value, self._delivered.value = int(state["epoch"]), int(state["delivered"])
        same = state.get("lanes") == self.lanes and state.get("world_size") == self.world_size
        if same:
            self.positions()[:] = np.asarray(state["positions"][self.rank], dtype=np.int64)
            self._fix_plan()
            return
        newest = max(block for rank in state["positions"] for block, _ in rank)
        log.warning(
            "the resampled stream was saved with %s rank(s) x %s lane(s), this run has %d x %d: every lane goes on "
            "from fresh draws (the run continues, but not with the samples an uninterrupted run would have seen)",
            state.get("world_size"),
            state.get("lanes"),
            self.world_size,
            self.lanes,
        )
        self.positions()[:] = (newest + 1, 0)
        self._fix_plan()


class ResampledShardDataset(ShardDataset):
    """Batches drawn from the shards with replacement (see the module); ``progress`` is its sampler."""

    def __init__(self, shards: ShardFiles, samples_per_epoch: int, lanes: int, *args, **kwargs):
        super().__init__(shards, *args, **kwargs)
        self.progress = StreamProgress(
            shards, samples_per_epoch, self.rank, self.world_size, self.batch_size, lanes, self.seed
        )
        self.probabilities = draw_probabilities(shards)

    def __len__(self) -> int:
        return self.progress.batches_left()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.progress.lanes:
            raise DataError(f"the stream has {self.progress.lanes} lanes but the loader {workers} workers")
        epoch, before, left, positions = self.progress.pass_plan()
        mine = left // workers + (worker < left % workers)
        if mine == 0:
            return
        lane = (before + worker) % workers
        block, consumed = (int(v) for v in positions[lane])
        yield from itertools.islice(self._lane_batches(lane, block, consumed, epoch), mine)

    def block_draws(self, lane: int, block: int) -> np.ndarray:
        """The shards block ``block`` of ``lane`` reads (the same in every run of this seed)."""
        rng = np.random.default_rng([self.seed, self.rank, lane, block])
        return rng.choice(len(self.probabilities), size=BLOCK_DRAWS, p=self.probabilities)

    def _lane_samples(self, lane: int, block: int, consumed: int, bad: list) -> Iterator[dict]:
        """The raw samples of ``lane`` from ``block`` on, skipping ``consumed``; each says its
        position as ``__position__`` (block, samples of it consumed)."""
        while True:
            raw = itertools.chain.from_iterable(self._stream_shard(int(k), bad) for k in self.block_draws(lane, block))
            if self.shuffle_buffer > 1:
                rng = random.Random(
                    int(np.random.SeedSequence([self.seed, self.rank, lane, block, 1]).generate_state(1)[0])
                )
                raw = webdataset().shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
            for position, sample in enumerate(raw, 1):
                if position > consumed:
                    sample["__position__"] = (block, position)
                    yield sample
            block, consumed = block + 1, 0

    def _lane_batches(self, lane: int, block: int, consumed: int, epoch: int) -> Iterator[dict]:
        bad: list[BadSample] = []

        def too_many(sample: BadSample, in_a_row: int) -> str:
            return f"no good sample in {in_a_row} draws from data.train_shards, e.g. {sample.describe()}"

        patience = 10 * (BLOCK_DRAWS * max(self.shards.counts) + self.shuffle_buffer)
        raws = self._lane_samples(lane, block, consumed, bad)
        for out, last in self._good_batches(raws, epoch, bad.append, patience, too_many):
            out["bad_samples"], out["stream_position"] = list(bad), (lane, *last["__position__"])
            bad.clear()
            yield out

    def _stream_shard(self, shard: int, bad: list) -> Iterator[dict]:
        """The raw samples of one drawn shard; a damaged or unreachable one follows data.on_bad_sample."""
        path = self.shards.paths[shard]
        count = 0
        try:
            for raw in shard_samples(path, self.retries, self.timeout_s):
                raw["__entry__"], raw["__shard__"] = count, shard
                count += 1
                yield raw
            error = None
        except Exception as err:  # noqa: BLE001 - any failure to read a user's shard is bad data
            error = err
        damage = shard_damage(self, shard, count, error)
        if damage is not None:
            bad.append(damage)
