"""Tar shards in the WebDataset layout: finding them, and how many samples each holds.

A shard is a tar file whose members are grouped into samples by their name up to the first dot:
`000000042.jpg` and `000000042.txt` (or `.json` with a "caption") are sample `000000042`. The
sample counts come from a `sizes.json` beside the shards (`{"shard-000000.tar": 10000, ...}`,
OpenCLIP's convention, written by `python launch/make_shards.py`); shards it does not list are
counted by reading their tar headers (not their data), which also finds truncated files early.
"""

import hashlib
import json
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..bad_samples import SKIP_FIX
from ..errors import DataError, format_list

SIZES_FILE = "sizes.json"
CAPTION_EXTENSIONS = ("txt", "json")
RECREATE_FIX = "re-create it (python launch/make_shards.py) or remove it from data.train_shards"


def webdataset():
    """The webdataset library (the `shards` extra), imported on first use so that the JSON path
    does not need it."""
    try:
        import webdataset as wds
    except ImportError:
        raise DataError(
            "tar shards need the webdataset library: pip install 'lilt_ds[shards]' (or pip install webdataset)."
        ) from None
    return wds


@dataclass(frozen=True)
class ShardFiles:
    """The shards of a training set, in the order given, and the samples each holds."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def digest(self) -> str:
        """Identifies the list (names and counts), to refuse resuming on another one."""
        names = [[os.path.basename(p), c] for p, c in zip(self.paths, self.counts)]
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]


def find_shards(
    spec: str | Sequence[str], on_bad_sample: str = "error", setting: str = "data.train_shards"
) -> ShardFiles:
    """Expand `spec` (a brace pattern such as "/data/shard-{000000..000099}.tar", or a list of
    them) and count the samples of every shard."""
    webdataset()
    from braceexpand import braceexpand  # a dependency of webdataset

    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = [path for pattern in patterns for path in braceexpand(pattern)]
    if not paths:
        raise DataError(f"{setting} is empty; give a brace pattern or a list of .tar files.")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} shards in {setting} do not exist:\n"
            f"{format_list(missing)}\nFix the pattern or the paths (shards must be local files)."
        )
    duplicated = sorted(path for path, times in Counter(paths).items() if times > 1)
    if duplicated:
        raise DataError(
            f"{setting} lists these shards more than once:\n{format_list(duplicated)}\nList each shard once."
        )
    sizes = _listed_sizes(paths)
    counts = [sizes[path] if path in sizes else _scanned_count(path, on_bad_sample) for path in paths]
    empty = [path for path, count in zip(paths, counts) if count == 0]
    if empty:
        raise DataError(
            f"{len(empty)} shards in {setting} hold no samples:\n{format_list(empty)}\nFor each, {RECREATE_FIX}."
        )
    return ShardFiles(tuple(paths), tuple(counts))


def sample_index(key: str) -> int:
    """The number of a sample: its key when that is a decimal number (the converter writes the
    entry's index in the source JSON, img2dataset a running number), else a stable hash of it."""
    name = key.rsplit("/", 1)[-1]
    if name.isdigit() and len(name) <= 18:
        return int(name)
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=7).digest(), "big")


def _listed_sizes(paths: list[str]) -> dict[str, int]:
    """Sample counts from the sizes.json of each folder that holds shards."""
    sizes: dict[str, int] = {}
    for folder in sorted({os.path.dirname(path) for path in paths}):
        listing = os.path.join(folder, SIZES_FILE)
        if not os.path.isfile(listing):
            continue
        try:
            with open(listing, encoding="utf-8") as handle:
                counts = json.load(handle)
            sizes.update({os.path.join(folder, name): int(count) for name, count in counts.items()})
        except (ValueError, TypeError, AttributeError) as err:
            raise DataError(
                f"{listing}: not a {SIZES_FILE} of shard sample counts "
                f'{{"shard.tar": count, ...}} ({err}); fix or delete it (shards it does '
                "not list are counted by reading them)."
            ) from None
    return sizes


def _scanned_count(path: str, on_bad_sample: str) -> int:
    """Samples in a tar, from its member headers. A damaged tar stops the run under
    on_bad_sample=error; under skip, its readable samples are used and the loss is counted when
    it is read."""
    count, damage = scan_tar(path)
    if damage is not None and on_bad_sample == "error":
        raise DataError(
            f"{path}: truncated or corrupt tar after {count} samples ({damage}); {RECREATE_FIX}, {SKIP_FIX}."
        )
    return count


def scan_tar(path: str) -> tuple[int, str | None]:
    """(number of samples, what is wrong with the file or None), reading member headers only."""
    split_name = webdataset().tariterators.base_plus_ext
    count, key = 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                prefix, _ = split_name(member.name)
                if member.isreg() and prefix is not None and prefix != key:
                    count, key = count + 1, prefix
    except (tarfile.TarError, OSError, EOFError) as err:
        return count, tar_error(err)
    return count, None


def tar_error(err: Exception) -> str:
    """A short description of an error raised while reading a tar (webdataset appends the stream
    object to the message, which helps nobody)."""
    message = str(err.args[0]) if err.args else ""
    return f"{type(err).__name__}: {message.split(' @ ')[0]}"
