"""Where a derived index of some source files is cached, and whether a cached one still matches.

An index is built once and stored beside its first source file, or in the lilt_ds cache folder
when that folder is not writable, under a name derived from the source paths and the build
settings. Its header records a fingerprint of every source (path, size, modification time and a
hash of its first and last MiB); a cache whose fingerprint differs from the files on disk was built
from other data, and is rebuilt with a warning that says what changed.
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable

import numpy as np

from ...fileio import advisory_lock, cache_folder
from .array_file import ArrayFile, ArrayFileError, write_array_file

logger = logging.getLogger("lilt_ds.data")

_HASHED_BYTES = 1 << 20

Index = ArrayFile | dict[str, np.ndarray]


def source_fingerprint(paths: list[str]) -> list[dict]:
    """What identifies the content of each file without reading all of it (a folder, such as a
    datasets folder: its files')."""
    prints = []
    for path in paths:
        if os.path.isdir(path):
            inner = source_fingerprint(
                sorted(
                    os.path.join(path, name) for name in os.listdir(path) if os.path.isfile(os.path.join(path, name))
                )
            )
            digest = hashlib.sha256(json.dumps([[p["size"], p["sha256_ends"]] for p in inner]).encode())
            prints.append(
                {
                    "path": os.path.abspath(path),
                    "size": sum(p["size"] for p in inner),
                    "mtime_ns": max((p["mtime_ns"] for p in inner), default=0),
                    "sha256_ends": digest.hexdigest(),
                }
            )
            continue
        stat = os.stat(path)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            digest.update(handle.read(_HASHED_BYTES))
            if stat.st_size > 2 * _HASHED_BYTES:
                handle.seek(-_HASHED_BYTES, os.SEEK_END)
            digest.update(handle.read(_HASHED_BYTES))
        prints.append(
            {
                "path": os.path.abspath(path),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256_ends": digest.hexdigest(),
            }
        )
    return prints


def fingerprint_difference(saved: list[dict], current: list[dict]) -> str | None:
    """How the files an index was built from differ from the current ones; None if they match."""
    if [s.get("path") for s in saved] != [c["path"] for c in current]:
        return f"built from {[s.get('path') for s in saved]}"
    for old, new in zip(saved, current):
        if old.get("size") != new["size"]:
            return f"{new['path']} changed size from {old.get('size')} to {new['size']} bytes"
        if old.get("sha256_ends") != new["sha256_ends"]:
            return f"{new['path']} has other content"
        if old.get("mtime_ns") != new["mtime_ns"]:
            return f"{new['path']} was modified since"
    return None


def cached_index(
    sources: list[str],
    settings: dict,
    build: Callable[[], dict[str, np.ndarray]],
    cache: str | None = "auto",
    kind: str = "index",
) -> Index:
    """The arrays `build()` makes from `sources` with `settings`, from the cache when a file there
    matches both, else built now and cached. `cache`: "auto" (beside the first source, else the
    lilt_ds cache folder), a folder, or None (build in memory, no file)."""
    if cache is None:
        return build()
    current = source_fingerprint(sources)
    candidates = cache_paths(sources, settings, cache, kind)
    with advisory_lock(sources[0]):  # ranks on one machine: one builds, the others then read
        for path in candidates:
            found = _open_matching(path, settings, current)
            if found is not None:
                return found
        arrays = build()
        meta = {"settings": settings, "sources": current}
        for path in candidates:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_array_file(path, arrays, meta)
            except OSError as err:
                logger.info("cannot write the %s cache %s (%s)", kind, path, err.strerror or err)
                continue
            logger.info("%s of %s cached in %s", kind, ", ".join(sources), path)
            return ArrayFile(path)
        logger.warning(
            "could not cache the %s of %s in %s; it is rebuilt by every process",
            kind,
            ", ".join(sources),
            " or ".join(candidates),
        )
        return arrays


def cache_paths(sources: list[str], settings: dict, cache: str, kind: str) -> list[str]:
    """Where the `kind` derived from `sources` with `settings` goes, in order of preference: named
    after both; with `cache` "auto" beside the first source, then in the lilt_ds cache folder."""
    identity = json.dumps([[os.path.abspath(s) for s in sources], settings], sort_keys=True)
    name = f"{os.path.basename(sources[0])}.{hashlib.sha256(identity.encode()).hexdigest()[:16]}.lilt-{kind}"
    if cache != "auto":
        return [os.path.join(os.path.abspath(os.path.expanduser(cache)), name)]
    beside = os.path.dirname(os.path.abspath(sources[0]))
    return [os.path.join(beside, name), os.path.join(cache_folder(), kind, name)]


def _open_matching(path: str, settings: dict, current: list[dict]) -> ArrayFile | None:
    if not os.path.exists(path):
        return None
    try:
        found = ArrayFile(path)
    except (ArrayFileError, OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("%s: unreadable cache (%s); rebuilding it.", path, err)
        return None
    if found.meta.get("settings") != settings:
        logger.warning("%s: cache built with other settings; rebuilding it.", path)
        return None
    difference = fingerprint_difference(found.meta.get("sources", []), current)
    if difference is not None:
        logger.warning("%s: cache built from other source files (%s); rebuilding it.", path, difference)
        return None
    return found
