"""A set of NumPy arrays in one file, memory-mapped when opened.

Opening costs no parsing and no copy: the arrays are views of the file's pages, which the page
cache shares between every process of the machine (all ranks and all their DataLoader workers).
The file starts with a JSON header (`meta`, given by the writer, plus the array table), so a
reader can check what the arrays were built from before using them. Files are written to a
temporary name and renamed into place: a reader never sees half a file, and processes that
still map a replaced file keep reading the old one.
"""

import json
import mmap
from typing import Any

import numpy as np

from ...fileio import atomic_path

MAGIC = b"LILTARR1"
_ALIGN = 64


class ArrayFileError(Exception):
    """The file is not a complete array file of this format (truncated, foreign, older)."""


class ArrayFile:
    """The `meta` and `arrays` of an opened file. Pickles as its path, so a process started with
    the spawn method maps the file again instead of receiving a copy of the arrays."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as handle:
            try:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise ArrayFileError("empty file") from None
        self.meta, self.arrays = _parse(self._map)

    def __reduce__(self):
        return ArrayFile, (self.path,)

    def touch_all_pages(self) -> None:
        """Fault every page of the file into this process now (a strided read of one byte per
        page). Processes forked after a file is mapped do not inherit its page table entries;
        touching them at start makes a process's memory flat instead of growing through the
        epoch as random reads reach new pages."""
        step = mmap.PAGESIZE
        np.frombuffer(self._map, dtype=np.uint8)[::step].sum(dtype=np.uint64)


def write_array_file(path: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write `arrays` (1-D) and `meta` (JSON-serialisable) to `path` atomically."""
    table, offset = {}, 0
    for name, values in arrays.items():
        values = np.ascontiguousarray(values)
        table[name] = {"dtype": values.dtype.str, "length": int(values.size), "offset": offset}
        offset = _aligned(offset + values.nbytes)
    header = json.dumps({"meta": meta, "arrays": table}).encode("utf-8")
    start = _aligned(len(MAGIC) + 8 + len(header))
    with atomic_path(path) as scratch, open(scratch, "wb") as out:
        out.write(MAGIC + len(header).to_bytes(8, "little") + header)
        for name, values in arrays.items():
            out.seek(start + table[name]["offset"])
            out.write(np.ascontiguousarray(values).tobytes())
        out.truncate(start + offset)


def _parse(buffer) -> tuple:
    if len(buffer) < len(MAGIC) + 8 or buffer[: len(MAGIC)] != MAGIC:
        raise ArrayFileError("not an array file of this version")
    size = int.from_bytes(buffer[len(MAGIC) : len(MAGIC) + 8], "little")
    try:
        header = json.loads(bytes(buffer[len(MAGIC) + 8 : len(MAGIC) + 8 + size]))
    except ValueError:
        raise ArrayFileError("unreadable header") from None
    start = _aligned(len(MAGIC) + 8 + size)
    arrays = {}
    for name, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"])
        end = start + spec["offset"] + spec["length"] * dtype.itemsize
        if end > len(buffer):
            raise ArrayFileError("truncated")
        arrays[name] = (
            np.frombuffer(buffer, dtype=dtype, count=spec["length"], offset=start + spec["offset"])
            if spec["length"]
            else np.zeros(0, dtype)
        )
    return header["meta"], arrays


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN
