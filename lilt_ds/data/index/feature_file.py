"""A folder of precomputed features, views x entries x width, memory-mapped and written in place.

Unlike an ArrayFile (written whole, then renamed), this one fills up piece by piece from several
processes at once, and survives being killed half way: the features live in one preallocated raw
file, and a status byte per (view, entry) says whether its row is written (``DONE``), could not
be computed (``BAD``: the image does not decode) or not yet (``EMPTY``). A writer sets the status
bytes only after the rows, so a row marked done is complete even if its writer was killed right
after. ``meta.json`` says what the rows were computed from; it is written last when a folder is
(re)started and removed first when it is reset, so a folder with a meta always matches it.
Processes map the same files, so the page cache holds one copy for every rank and worker.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np

from ...fileio import advisory_lock, atomic_path

EMPTY, DONE, BAD = 0, 1, 2
_META, _FEATURES, _STATUS, _LOCK = "meta.json", "features.f32", "status.u8", "lock"


class FeatureFile:
    """``features[view, entry]`` (float32 rows of ``width``) and ``status[view, entry]`` of a folder;
    ``writable`` maps them for writing. Pickles as its folder, so a DataLoader worker maps the
    files again instead of receiving a copy of the rows."""

    def __init__(self, folder: str, writable: bool = False):
        self.folder, self.writable = folder, writable
        self.meta = read_meta(folder)
        if self.meta is None:
            raise FileNotFoundError(f"{folder}: no feature cache here (no {_META})")
        views, entries, width = self.meta["views"], self.meta["entries"], self.meta["width"]
        mode = "r+" if writable else "r"
        self.features = _map(os.path.join(folder, _FEATURES), np.float32, (views, entries, width), mode)
        self.status = _map(os.path.join(folder, _STATUS), np.uint8, (views, entries), mode)

    def __reduce__(self):
        return FeatureFile, (self.folder, self.writable)

    @property
    def shape(self):
        return self.features.shape

    def complete(self) -> bool:
        return bool((self.status != EMPTY).all())

    def write(self, view: int, entries: np.ndarray, rows: np.ndarray | None, bad: np.ndarray) -> None:
        """Store ``rows`` for ``entries[~bad]`` of ``view`` and mark ``entries[bad]`` bad; the
        status bytes go last."""
        good = entries[~bad]
        if len(good):
            self.features[view, good] = rows
        self.status[view, entries[bad]] = BAD
        self.status[view, good] = DONE


def read_meta(folder: str) -> dict[str, Any] | None:
    """The folder's meta, or None when it has none or its files are not of the size it says (a
    folder someone emptied by hand): then it has to be started again."""
    try:
        with open(os.path.join(folder, _META)) as handle:
            meta = json.load(handle)
        sizes = _sizes(meta)
        if any(os.path.getsize(os.path.join(folder, name)) != size for name, size in sizes.items()):
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sizes(meta: dict[str, Any]) -> dict[str, int]:
    return {_FEATURES: meta["views"] * meta["entries"] * meta["width"] * 4, _STATUS: meta["views"] * meta["entries"]}


def start_feature_file(folder: str, meta: dict[str, Any]) -> None:
    """(Re)start ``folder`` as an empty feature file described by ``meta`` (``views``, ``entries``,
    ``width`` and whatever identifies what the rows are computed from)."""
    os.makedirs(folder, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, _META))
    for name, size in _sizes(meta).items():
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a process still mapping the old file keeps its own copy
        with open(path, "wb") as handle:
            handle.truncate(size)  # sparse: zero status bytes = nothing written yet
    with atomic_path(os.path.join(folder, _META)) as scratch, open(scratch, "w") as handle:
        json.dump(meta, handle, indent=1, sort_keys=True)


def locked(folder: str):
    """An advisory lock on the folder for the block: the processes of one machine take turns to
    check and restart it (unlocked, every process checks, which is safe as they all reach the same
    decision)."""
    os.makedirs(folder, exist_ok=True)
    return advisory_lock(os.path.join(folder, _LOCK), create=True)


def _map(path: str, dtype, shape, mode: str) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)
