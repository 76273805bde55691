"""Tar shards in the WebDataset layout: finding them, and how many samples each holds.

A shard is a tar file whose members are grouped into samples by their name up to the first dot:
`000000042.jpg` and `000000042.txt` (or `.json` with a "caption") are sample `000000042`. Shards are
local paths, `pipe:COMMAND`s or URLs (`shards.sources`). Their sample counts come from files beside
them, never from the tars: a `sizes.json` (`{"shard-000000.tar": 10000, ...}`, OpenCLIP's
convention, written by `lilt-make-shards`), or img2dataset's `<shard>_stats.json` (`successes`);
shards neither counts share `data.samples_per_epoch`.
"""

import hashlib
import json
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

from ..errors import DataError, format_list
from .sources import LOCAL, PIPE, check_backend, local_path, read_text, shard_kind

SIZES_FILE = "sizes.json"
STATS_SUFFIX = "_stats.json"  # img2dataset: 00000.tar beside 00000_stats.json
COUNT_READERS = 16  # remote counts files read at once
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
    """The shards of a training set, in the order given, and the samples each holds (``estimated``:
    the counts are data.samples_per_epoch shared out, not read from counts files)."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    estimated: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    def digest(self) -> str:
        """Identifies the list (names and counts), to refuse resuming on another one."""
        names = [[os.path.basename(p), c] for p, c in zip(self.paths, self.counts)]
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]


def expand_shards(spec: str | Sequence[str], setting: str = "data.train_shards") -> list[str]:
    """The shard addresses of `spec` (a brace pattern such as "/data/shard-{000000..000099}.tar",
    a pipe:COMMAND or URL with braces, or a list of them), checked without reading any shard: local
    files exist, each URL scheme has its fsspec backend, none is listed twice."""
    from braceexpand import braceexpand  # a dependency of webdataset

    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = [path for pattern in patterns for path in braceexpand(pattern)]
    if not paths:
        raise DataError(f"{setting} is empty; give a brace pattern or a list of .tar files.")
    local = [path for path in paths if shard_kind(path) == LOCAL]
    missing = [path for path in local if not os.path.isfile(local_path(path))]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} shards in {setting} do not exist:\n"
            f"{format_list(missing)}\nFix the pattern or the paths."
        )
    first_of_scheme: dict[str, str] = {}
    for path in paths:
        if shard_kind(path) not in (LOCAL, PIPE):
            first_of_scheme.setdefault(urlparse(path).scheme, path)
    for path in first_of_scheme.values():
        check_backend(path, setting)
    duplicated = sorted(path for path, times in Counter(paths).items() if times > 1)
    if duplicated:
        raise DataError(
            f"{setting} lists these shards more than once:\n{format_list(duplicated)}\nList each shard once."
        )
    return paths


def find_shards(
    spec: str | Sequence[str],
    samples_per_epoch: int | None = None,
    setting: str = "data.train_shards",
    timeout_s: float = 60.0,
) -> ShardFiles:
    """The shards of `spec` (see expand_shards) and their sample counts, from the counts files
    beside them; without counts for every shard, data.samples_per_epoch shared out evenly."""
    paths = expand_shards(spec, setting)
    counts = _counts(paths, timeout_s)
    uncounted = [path for path in paths if path not in counts]
    if uncounted and samples_per_epoch is None:
        pipes = "pipe: commands have none; " if any(shard_kind(p) == PIPE for p in uncounted) else ""
        raise DataError(
            f"{len(uncounted)} of the {len(paths)} shards in {setting} have no sample count:\n"
            f"{format_list(uncounted)}\nNo {SIZES_FILE} beside them lists them and no img2dataset "
            f"<shard>{STATS_SUFFIX} is there ({pipes}the tars are not opened to count them). "
            "Set data.samples_per_epoch to the samples in all the "
            f"shards, or write a {SIZES_FILE} (local shards: lilt-make-shards --count PATTERN)."
        )
    if samples_per_epoch is not None and not uncounted:
        total = sum(counts.values())
        if samples_per_epoch != total:
            raise DataError(
                f"data.samples_per_epoch = {samples_per_epoch}, but the counts files beside the shards of {setting} "
                f"say they hold {total} samples: set data.samples_per_epoch to null (it is for shards without "
                "counts files)."
            )
    if uncounted:
        share, extra = divmod(samples_per_epoch, len(paths))
        estimated = tuple(share + (k < extra) for k in range(len(paths)))
        if min(estimated) == 0:
            raise DataError(
                f"data.samples_per_epoch = {samples_per_epoch} is fewer than the {len(paths)} shards of {setting}: "
                "give the samples in all the shards."
            )
        return ShardFiles(tuple(paths), estimated, estimated=True)
    empty = [path for path in paths if counts[path] == 0]
    if empty:
        raise DataError(
            f"{len(empty)} shards in {setting} hold no samples:\n{format_list(empty)}\nFor each, {RECREATE_FIX}."
        )
    return ShardFiles(tuple(paths), tuple(counts[path] for path in paths))


def sample_index(key: str) -> int:
    """The number of a sample: its key when that is a decimal number (the converter writes the
    entry's index in the source JSON, img2dataset a running number), else a stable hash of it."""
    name = key.rsplit("/", 1)[-1]
    if name.isdigit() and len(name) <= 18:
        return int(name)
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=7).digest(), "big")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def _counts(paths: list[str], timeout_s: float, sizes_files: bool = True) -> dict[str, int]:
    """Sample counts of `paths` from each folder's sizes.json (unless not `sizes_files`), then each
    shard's img2dataset _stats.json; pipe: shards have neither. Remote files are read several at once."""
    readable = [path for path in paths if shard_kind(path) != PIPE]
    folders = sorted({_parent(path) for path in readable}) if sizes_files else []
    with ThreadPoolExecutor(COUNT_READERS) as pool:
        listings = dict(zip(folders, pool.map(lambda f: read_text(f"{f}/{SIZES_FILE}", timeout_s), folders)))
        sizes: dict[str, int] = {}
        for folder, text in listings.items():
            if text is not None:
                sizes.update({f"{folder}/{name}": count for name, count in _sizes(text, f"{folder}/{SIZES_FILE}")})
        counts = {path: sizes[_normal(path)] for path in readable if _normal(path) in sizes}
        rest = [path for path in readable if path not in counts and path.endswith(".tar")]
        stats = pool.map(lambda p: read_text(p[: -len(".tar")] + STATS_SUFFIX, timeout_s), rest)
        for path, text in zip(rest, stats):
            if text is not None:
                counts[path] = _successes(text, path[: -len(".tar")] + STATS_SUFFIX)
    return counts


def _normal(path: str) -> str:
    """A path as the sizes.json keys are joined to their folder."""
    return f"{_parent(path)}/{path.rsplit('/', 1)[-1]}"


def _sizes(text: str, where: str) -> list[tuple[str, int]]:
    try:
        listing = json.loads(text)
        return [(name, int(count)) for name, count in listing.items()]
    except (ValueError, TypeError, AttributeError) as err:
        raise DataError(
            f'{where}: not a {SIZES_FILE} of shard sample counts {{"shard.tar": count, ...}} ({err}); fix or '
            "delete it (lilt-make-shards --count PATTERN writes one)."
        ) from None


def _successes(text: str, where: str) -> int:
    try:
        return int(json.loads(text)["successes"])
    except (ValueError, TypeError, KeyError) as err:
        raise DataError(
            f'{where}: not an img2dataset stats file with a "successes" count ({type(err).__name__}: {err}); '
            f"fix or delete it, or list the shard in a {SIZES_FILE}."
        ) from None


def count_shards(spec: str | Sequence[str]) -> dict[str, int]:
    """{shard path: samples} of local shards, from their _stats.json where img2dataset wrote one, else
    from their tar headers, whatever a sizes.json says (`lilt-make-shards --count` writes them there)."""
    paths = expand_shards(spec, "--count")
    if any(shard_kind(path) != LOCAL for path in paths):
        raise DataError("--count counts local shards; for remote ones set data.samples_per_epoch.")
    counts = _counts(paths, 60.0, sizes_files=False)
    for path in paths:
        if path not in counts:
            count, damage = scan_tar(local_path(path))
            if damage is not None:
                raise DataError(f"{path}: truncated or corrupt tar after {count} samples ({damage}); {RECREATE_FIX}.")
            counts[path] = count
    return {path: counts[path] for path in paths}


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
