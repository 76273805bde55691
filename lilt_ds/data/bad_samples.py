"""Missing or unreadable images: the `on_bad_sample` policy and the count of what it skipped.

`error` stops at the first bad image. `skip` replaces it by another sample and records it here;
the run aborts once the bad entries exceed `max_bad_fraction` of the dataset, so a broken copy
of the data cannot train quietly. Nothing is dropped without being counted and logged.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ..distributed import all_gather_objects
from .errors import DataError, format_list

logger = logging.getLogger("lilt_ds.data")

ON_BAD_SAMPLE = ("error", "skip")
# The end of every error that on_bad_sample=skip would have avoided.
SKIP_FIX = (
    "or set data.on_bad_sample=skip to replace bad images by others (counted, and the "
    "run stops above data.max_bad_fraction)"
)
_LOGGED_ONE_BY_ONE = 20  # after this many, bad entries are logged in summary only
_EXAMPLES_KEPT = 5


@dataclass(frozen=True)
class BadSample:
    """One bad image: its dataset index, where the entry came from and what went wrong.

    `lost` > 0 marks instead a run of samples that cannot be told apart, such as the unreadable
    rest of a truncated tar shard (`index` is then -1 and `entry` is where the file breaks)."""

    index: int
    file: str
    entry: int
    path: str
    reason: str
    lost: int = 0

    def describe(self) -> str:
        return f"{self.file}, entry {self.entry}: image {self.path}: {self.reason}"


def check_bad_sample_policy(on_bad_sample: str, max_bad_fraction: float) -> None:
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise DataError(f"data.on_bad_sample = {on_bad_sample!r}; choose one of {list(ON_BAD_SAMPLE)}.")
    if (
        isinstance(max_bad_fraction, bool)
        or not isinstance(max_bad_fraction, (int, float))
        or not 0 <= max_bad_fraction <= 1
    ):
        raise DataError(
            f"data.max_bad_fraction = {max_bad_fraction!r}; give a fraction between "
            "0 and 1 (0.01 tolerates 1% bad entries)."
        )


class BadSampleLog:
    """The bad entries one rank has met: `missing` (found by the existence check at load, the same
    on every rank), `unreadable` (failed to decode on this rank), `lost` (per file, samples lost
    in a damaged shard) and `replaced` (draws served by a replacement, or skipped). `count` is
    the number of distinct bad entries."""

    def __init__(self, dataset_size: int, max_bad_fraction: float):
        self.dataset_size = dataset_size
        self.max_bad_fraction = max_bad_fraction
        self.missing: set = set()
        self.unreadable: set = set()
        self.lost: dict[str, int] = {}
        self.replaced = 0
        self.examples: list[BadSample] = []

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.unreadable) + sum(self.lost.values())

    def record_missing(self, samples: Iterable[BadSample]) -> None:
        """Entries whose file does not exist (the load-time check)."""
        samples = list(samples)
        self.missing.update(s.index for s in samples)
        self.examples.extend(samples[: max(0, _EXAMPLES_KEPT - len(self.examples))])
        if samples:
            logger.warning(
                "on_bad_sample=skip: %d of %d images are missing and will be replaced:\n%s",
                len(samples),
                self.dataset_size,
                format_list([s.describe() for s in samples], _LOGGED_ONE_BY_ONE),
            )
        self.check()

    def record(self, sample: BadSample) -> None:
        """A draw that was replaced because its image is missing or does not decode, or samples
        lost in a damaged file (counted once per file, however often it is read)."""
        if sample.lost:
            if sample.lost > self.lost.get(sample.file, 0):
                self.lost[sample.file] = sample.lost
                logger.warning("on_bad_sample=skip: %s", sample.describe())
                self.examples.append(sample)
                del self.examples[_EXAMPLES_KEPT:]
                self.check()
            return
        self.replaced += 1
        if sample.index in self.missing or sample.index in self.unreadable:
            return
        self.unreadable.add(sample.index)
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append(sample)
        if len(self.unreadable) <= _LOGGED_ONE_BY_ONE:
            logger.warning("on_bad_sample=skip: replaced an unreadable image: %s", sample.describe())
        elif len(self.unreadable) % 1000 == 0:
            logger.warning("on_bad_sample=skip: %d unreadable images so far", len(self.unreadable))
        self.check()

    def check(self) -> None:
        """Abort when the bad entries exceed max_bad_fraction of the dataset."""
        if self.count <= self.max_bad_fraction * self.dataset_size:
            return
        examples = format_list([s.describe() for s in self.examples])
        raise DataError(
            f"{self.count} of {self.dataset_size} entries ({self.count / self.dataset_size:.2%}) "
            f"have a missing or unreadable image ({len(self.missing)} missing, "
            f"{len(self.unreadable) + sum(self.lost.values())} unreadable), more than "
            f"data.max_bad_fraction = {self.max_bad_fraction}. For example:\n{examples}\n"
            "Fix the image paths (data.image_root can rewrite a prefix) or the files; raise "
            "data.max_bad_fraction only if losing this much data is acceptable."
        )

    def state_dict(self) -> dict:
        return {"unreadable": sorted(self.unreadable), "replaced": self.replaced, "lost": dict(self.lost)}

    def load_state_dict(self, state: dict) -> None:
        self.unreadable = set(state["unreadable"])
        self.replaced = int(state["replaced"])
        self.lost = dict(state.get("lost", {}))


def global_bad_sample_counts(log: BadSampleLog) -> dict[str, int]:
    """Counts over all ranks when torch.distributed is initialised (a collective: call it on every
    rank), else this rank's: `bad_entries` (distinct), `missing`, `unreadable`, `replaced`."""
    gathered = all_gather_objects((sorted(log.unreadable), log.replaced, log.lost))
    unreadable = set().union(*(set(u) for u, _, _ in gathered))
    replaced = sum(r for _, r, _ in gathered)
    lost: dict[str, int] = {}
    for _, _, rank_lost in gathered:
        for file, count in rank_lost.items():
            lost[file] = max(lost.get(file, 0), count)
    unreadable_count = len(unreadable - log.missing) + sum(lost.values())
    return {
        "bad_entries": len(log.missing) + unreadable_count,
        "missing": len(log.missing),
        "unreadable": unreadable_count,
        "replaced": replaced,
    }
