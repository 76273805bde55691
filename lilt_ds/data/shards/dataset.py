"""The pretraining dataset read from tar shards (WebDataset layout) instead of a caption JSON.

Each DataLoader worker of each rank reads its own share of the epoch's shards (see
`shards.progress`) with the `webdataset` library, mixes their samples in a seeded shuffle buffer
and yields whole batches in the same form as the JSON path: `{"images", "input_ids",
"attention_mask", "index", "bad_samples", "shards_done"}` (TrainLoader removes the last two). A
sample's augmentation and caption draw follow from (seed, epoch, index) exactly as on the JSON
path, so a shard written by `python launch/make_shards.py` gives the same training samples as
its JSON (the order differs: shards are shuffled by shard and within a buffer).

Bad samples (no image, no caption, an image that does not decode) and damaged shards (truncated,
fewer samples than sizes.json lists) follow `data.on_bad_sample`: `error` stops with the shard,
the sample and the fix; `skip` leaves them out, and the main process counts them.
"""

import io
import itertools
import json
import random
from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..bad_samples import SKIP_FIX, BadSample, BadSampleLog, check_bad_sample_policy
from ..errors import DataError, format_list
from ..index.captions import entry_captions
from ..preprocessing.images import SHARD_IMAGE_KEYS, UndecodableImage, open_image
from ..sample_rng import augmented, caption_choice
from .files import CAPTION_EXTENSIONS, RECREATE_FIX, ShardFiles, sample_index, tar_error, webdataset
from .progress import ShardProgress
from .sources import ShardUnreadable, error_text, shard_samples


class ShardDataset(IterableDataset):
    """Batches of `batch_size` training samples from `shards`; `progress` is its sampler and
    `bad_samples` (a BadSampleLog) is filled by TrainLoader in the main process."""

    def __init__(
        self,
        shards: ShardFiles,
        transform,
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        on_bad_sample: str = "error",
        max_bad_fraction: float = 0.01,
        clean: Callable[[str], str] | None = None,
        shuffle_buffer: int = 1000,
        retries: int = 3,
        timeout_s: float = 60.0,
    ):
        check_bad_sample_policy(on_bad_sample, max_bad_fraction)
        webdataset()
        self.shards = shards
        self.transform = transform
        self.collate = collate
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.clean = clean
        self.shuffle_buffer = shuffle_buffer
        self.retries, self.timeout_s = retries, timeout_s
        self.progress = ShardProgress(shards, rank, world_size, batch_size, seed)
        self.bad_samples = BadSampleLog(shards.total, max_bad_fraction)

    def __len__(self) -> int:
        """Batches this rank yields in the current pass over the epoch."""
        return self.progress.batches_left()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, remaining = self.progress.epoch_plan()
        rank_batches = self.progress.batches_left()
        batches = rank_batches // workers + (worker < rank_batches % workers)
        if batches == 0:
            return
        # Rank r takes every world_size-th shard from r, its worker w every workers-th of those
        # (shards are shared only when a resumed epoch has fewer left than there are readers).
        slot, slots = self.rank + self.world_size * worker, self.world_size * workers
        mine = remaining[slot::slots].tolist() or [int(remaining[slot % len(remaining)])]
        ledger = _Ledger()
        passes = self._passes(mine, ledger)
        if self.shuffle_buffer > 1:
            seed = int(np.random.SeedSequence([self.seed, epoch, slot]).generate_state(1)[0])
            shuffle = webdataset().shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed))
            passes = (shuffle(one_pass) for one_pass in passes)
        samples = itertools.chain.from_iterable(passes)
        yield from itertools.islice(self._batches(samples, ledger, epoch, mine), batches)

    def _batches(self, samples: Iterator[dict], ledger: "_Ledger", epoch: int, shards: list[int]):
        """Collated batches of the good samples; each carries the bad samples met and the shards
        completed since the previous one."""

        def read(raws):
            for raw in raws:
                ledger.consumed(raw["__read__"])
                yield raw

        def too_many(sample: BadSample, _in_a_row: int) -> str:
            return (
                f"every sample of the shards\n{format_list([self.shards.paths[k] for k in shards])}\n"
                f"is bad, e.g. {sample.describe()}. Re-create them or fix data.train_shards."
            )

        patience = sum(self.shards.counts[k] for k in shards) + self.shuffle_buffer
        for out, _ in self._good_batches(read(samples), epoch, lambda bad: ledger.bad.append(bad), patience, too_many):
            out["bad_samples"], out["shards_done"] = ledger.take()
            yield out

    def _good_batches(self, raws: Iterator[dict], epoch: int, on_bad, patience: int, too_many):
        """(collated batch, the raw sample that completed it) of the good samples of `raws`; a bad
        sample goes to `on_bad`, and more than `patience` in a row stop with `too_many(sample, count)`."""
        batch, bad_in_a_row = [], 0
        for raw in raws:
            sample = self._sample(raw, epoch)
            if isinstance(sample, BadSample):
                on_bad(sample)
                bad_in_a_row += 1
                if bad_in_a_row > patience:
                    raise DataError(too_many(sample, bad_in_a_row))
                continue
            bad_in_a_row = 0
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch), raw
                batch = []

    def _passes(self, shards: list[int], ledger: "_Ledger") -> Iterator[Iterator[dict]]:
        """Passes over `shards`, each the samples in order as webdataset groups them, for as long
        as the consumer needs batches (a pass is shuffled on its own: no sample enters the
        buffer twice while its first read is still in it)."""
        while True:
            reads_before = ledger.reads
            yield (raw for shard in shards for raw in self._read_shard(shard, ledger))
            if all(ledger.read_count(r) == 0 for r in range(reads_before, ledger.reads)):
                raise DataError(
                    f"no sample could be read from the shards {format_list([self.shards.paths[k] for k in shards])}"
                )

    def _read_shard(self, shard: int, ledger: "_Ledger") -> Iterator[dict]:
        """The samples of one shard. Each is held back until the next one is read, so that the
        ledger knows the shard's count before its last sample leaves (and the batch holding that
        sample completes the shard)."""
        path = self.shards.paths[shard]
        read_id = ledger.start(shard)
        count, held, error = 0, None, None
        try:
            for raw in shard_samples(path, self.retries, self.timeout_s):
                raw["__read__"], raw["__entry__"], raw["__shard__"] = read_id, count, shard
                count += 1
                if held is not None:
                    yield held
                held = raw
        except Exception as err:  # noqa: BLE001 - any failure to read a user's tar is bad data
            error = err
        damage = shard_damage(self, shard, count, error)
        if damage is not None:
            ledger.bad.append(damage)
        ledger.finish(read_id, count)
        if held is not None:
            yield held

    def _sample(self, raw: dict, epoch: int):
        """The training sample of a raw tar sample, or the BadSample saying why there is none."""
        key, index = raw["__key__"], sample_index(raw["__key__"])
        image_type = next((ext for ext in SHARD_IMAGE_KEYS if ext in raw), None)
        texts, problem = _captions(raw, self.clean)
        if image_type is None:
            problem = (
                f"sample {key} has no image (.{', .'.join(SHARD_IMAGE_KEYS)}); it holds "
                f"{', '.join('.' + k for k in raw if not k.startswith('__'))}"
            )
        pixels = None
        if problem is None:
            try:
                with open_image(io.BytesIO(raw[image_type])) as image:
                    pixels = augmented(self.transform, image, self.seed, epoch, index, index)
            except UndecodableImage as err:
                problem = f"cannot decode: {err}"
        if problem is not None:
            bad = BadSample(index, raw["__url__"], raw["__entry__"], f"{key}.{image_type or '?'}", problem)
            if self.on_bad_sample == "error":
                raise DataError(f"{bad.describe()}. Fix the shard: {RECREATE_FIX}, {SKIP_FIX}.")
            return bad
        return {
            "image": pixels,
            "caption": texts[caption_choice(self.seed, epoch, index, len(texts))],
            "index": index,
            "bad_samples": [],
        }


def shard_damage(dataset: ShardDataset, shard: int, count: int, error: BaseException | None) -> BadSample | None:
    """What a read of ``shard`` that delivered ``count`` samples and ended with ``error`` (None: at its
    end) lost: None, a BadSample for the rest of the shard (on_bad_sample=skip), or a DataError."""
    path, expected = dataset.shards.paths[shard], dataset.shards.counts[shard]
    damage, fix = None, RECREATE_FIX
    if isinstance(error, ShardUnreadable):
        damage = f"unreadable after {error.attempts} attempts, the last {error_text(error.error)}"
        fix = "check the address and the network (data.shard_retries and data.shard_timeout_s set the patience)"
    elif error is not None:
        damage = f"truncated or corrupt tar ({tar_error(error)})"
    elif count < expected and not dataset.shards.estimated:
        damage = f"holds {count} samples, its counts file lists {expected}"
    if damage is None:
        return None
    if dataset.on_bad_sample == "error":
        raise DataError(f"{path}: {damage} after {count} samples; {fix}, {SKIP_FIX}.")
    lost = max(expected - count, 1)
    return BadSample(
        -1, path, count, "(the rest of the shard)", f"{damage}: {lost} samples lost after the first {count}", lost=lost
    )


def _captions(raw: dict, clean):
    """(cleaned captions, None) from the sample's .txt, else its .json "caption"; ([], problem)
    when it has none or they are invalid (the checks of the JSON format)."""
    caption_type = next((ext for ext in CAPTION_EXTENSIONS if ext in raw), None)
    if caption_type is None:
        return [], (
            f'no caption: the sample has no .txt, nor a .json with a "caption" '
            f"(it holds {', '.join('.' + k for k in raw if not k.startswith('__'))})"
        )
    try:
        text = raw[caption_type].decode("utf-8")
        entry = {"caption": text} if caption_type == "txt" else json.loads(text)
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        return [], f"its .{caption_type} does not parse: {err}"
    if not isinstance(entry, dict):
        return [], f'its .json holds a JSON {type(entry).__name__}, expected an object with a "caption"'
    texts, errors = entry_captions(entry, clean)
    return texts, (f".{caption_type}: {'; '.join(errors)}" if errors else None)


class _Ledger:
    """One worker's account of its shard reads: a read is done once all its samples have left
    the shuffle buffer; `take()` hands the shards done and the bad samples met since the last
    batch to that batch."""

    def __init__(self):
        self.reads = 0
        self._shard: dict[int, int] = {}
        self._total: dict[int, int] = {}
        self._left: dict[int, int] = {}
        self._done: list[int] = []
        self.bad: list[BadSample] = []

    def start(self, shard: int) -> int:
        read_id, self.reads = self.reads, self.reads + 1
        self._shard[read_id], self._left[read_id] = shard, 0
        return read_id

    def read_count(self, read_id: int) -> int:
        return self._total.get(read_id, 0)

    def finish(self, read_id: int, count: int) -> None:
        self._total[read_id] = count
        self._left[read_id] += count
        self._check(read_id)

    def consumed(self, read_id: int) -> None:
        self._left[read_id] -= 1
        self._check(read_id)

    def take(self):
        bad, done = self.bad, self._done
        self.bad, self._done = [], []
        return bad, done

    def _check(self, read_id: int) -> None:
        if read_id in self._total and self._left[read_id] == 0:
            self._done.append(self._shard[read_id])
            del self._left[read_id]
