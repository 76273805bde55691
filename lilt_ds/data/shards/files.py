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
from collections.abc import Mapping, Sequence
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
    some counts are data.samples_per_epoch shared out or a source's mean, not read from counts files).
    A weighted mixture also says each shard's source (``sources``) and the sources' ``weights``."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    estimated: bool = False
    sources: tuple[int, ...] = ()
    weights: tuple[float, ...] = (1.0,)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def source_of(self, shard: int) -> int:
        return self.sources[shard] if self.sources else 0

    def digest(self) -> str:
        """Identifies the list (names, counts, sources and weights), to refuse resuming on another one."""
        names = [[os.path.basename(p), c, self.source_of(k)] for k, (p, c) in enumerate(zip(self.paths, self.counts))]
        return hashlib.sha256(json.dumps([names, list(self.weights)]).encode()).hexdigest()[:16]


def mixture_sources(spec) -> list[tuple[list[str], float]]:
    """[(patterns, weight)] of data.train_shards: one source of weight 1 for a pattern or a list of
    them, one per entry for a list of {urls, weight} mappings (checked: URLs given, weights > 0)."""
    if isinstance(spec, str):
        return [([spec], 1.0)]
    entries = list(spec)
    kinds = {isinstance(entry, Mapping) for entry in entries}
    if kinds == {False}:
        return [(entries, 1.0)]
    if kinds != {True}:
        raise DataError(
            "data.train_shards mixes patterns and {urls, weight} entries: write every entry of a mixture as "
            "{urls: PATTERN_OR_LIST, weight: W}."
        )
    sources = []
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - {"urls", "weight"})
        if unknown:
            raise DataError(f"data.train_shards[{i}] has unknown key(s) {unknown}: a source is {{urls, weight}}.")
        urls = entry.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if not urls or not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) and u for u in urls):
            raise DataError(
                f"data.train_shards[{i}].urls = {entry.get('urls')!r}: a mixture entry needs its shards, a pattern "
                "such as /data/cc12m/{00000..01242}.tar or a list of them."
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(
                f"data.train_shards[{i}].weight = {weight!r}: expected a positive number (the source's share of the "
                "samples drawn, relative to the others')."
            )
        sources.append((list(urls), float(weight)))
    return sources


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
    spec,
    samples_per_epoch: int | None = None,
    setting: str = "data.train_shards",
    timeout_s: float = 60.0,
    resampled: bool = False,
) -> ShardFiles:
    """The shards of `spec` (patterns, or a mixture of {urls, weight} sources) and their sample
    counts, from the counts files beside them. Read in order (not `resampled`): without counts for
    every shard, data.samples_per_epoch shared out evenly. Resampled: the counts only weigh the draws
    (a shard without one counts as its source's mean), and an epoch is data.samples_per_epoch samples
    (default: the counted total)."""
    sources = mixture_sources(spec)
    if len(sources) > 1 and not resampled:
        raise DataError(
            f"{setting} is a weighted mixture of {len(sources)} sources, which draws shards with replacement: set "
            "data.resampled=true (and data.samples_per_epoch, the samples of an epoch)."
        )
    paths, source_of = [], []
    for i, (patterns, _) in enumerate(sources):
        found = expand_shards(patterns, f"{setting}[{i}].urls" if len(sources) > 1 else setting)
        paths += found
        source_of += [i] * len(found)
    twice = sorted(path for path, times in Counter(paths).items() if times > 1)
    if twice:
        raise DataError(f"these shards are in more than one source of {setting}:\n{format_list(twice)}")
    counts = _counts(paths, timeout_s)
    uncounted = [path for path in paths if path not in counts]
    if uncounted and samples_per_epoch is None:
        pipes = "pipe: commands have none; " if any(shard_kind(p) == PIPE for p in uncounted) else ""
        purpose = "the samples of an epoch" if resampled else "the samples in all the shards"
        raise DataError(
            f"{len(uncounted)} of the {len(paths)} shards in {setting} have no sample count:\n"
            f"{format_list(uncounted)}\nNo {SIZES_FILE} beside them lists them and no img2dataset "
            f"<shard>{STATS_SUFFIX} is there ({pipes}the tars are not opened to count them). "
            f"Set data.samples_per_epoch to {purpose}, or write a {SIZES_FILE} "
            "(local shards: lilt-make-shards --count PATTERN)."
        )
    if resampled:
        return _resampled_files(paths, source_of, counts, [w for _, w in sources], setting)
    if samples_per_epoch is not None and not uncounted:
        total = sum(counts.values())
        if samples_per_epoch != total:
            raise DataError(
                f"data.samples_per_epoch = {samples_per_epoch}, but the counts files beside the shards of {setting} "
                f"say they hold {total} samples: set data.samples_per_epoch to null (it is for shards without "
                "counts files), or data.resampled=true for epochs of that many samples drawn with replacement."
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
    _check_not_empty(paths, counts, setting)
    return ShardFiles(tuple(paths), tuple(counts[path] for path in paths))


def _check_not_empty(paths: list[str], counts: dict[str, int], setting: str) -> None:
    empty = [path for path in paths if counts.get(path) == 0]
    if empty:
        raise DataError(
            f"{len(empty)} shards in {setting} hold no samples:\n{format_list(empty)}\nFor each, {RECREATE_FIX}."
        )


def _resampled_files(paths, source_of, counts, weights, setting) -> ShardFiles:
    """Counts for drawing with replacement: a shard without one counts as its source's counted mean
    (1 where the source has no count at all: its shards are drawn alike)."""
    _check_not_empty(paths, counts, setting)
    filled = []
    for source in range(len(weights)):
        known = [counts[p] for p, s in zip(paths, source_of) if s == source and p in counts]
        mean = max(1, round(sum(known) / len(known))) if known else 1
        filled += [counts.get(p, mean) for p, s in zip(paths, source_of) if s == source]
    return ShardFiles(
        tuple(paths),
        tuple(filled),
        estimated=len(counts) < len(paths),
        sources=tuple(source_of) if len(weights) > 1 else (),
        weights=tuple(weights),
    )


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
