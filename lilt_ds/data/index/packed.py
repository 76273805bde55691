"""Millions of strings in a few numpy arrays instead of millions of Python objects.

A DataLoader worker forked from the main process shares its memory copy-on-write, but merely
reading a Python `str` writes its reference count, so a list of 10M captions ends up copied into
every worker. Flat arrays have no per-string objects and stay shared; they can also live in a
memory-mapped file (see `array_file`), which all processes of a machine share.
"""

from array import array
from collections.abc import Iterable

import numpy as np


def smallest_offset_dtype(largest: int) -> np.dtype:
    """uint32 offsets while they fit (half the memory of int64), else int64."""
    return np.dtype(np.uint32) if largest < 2**32 else np.dtype(np.int64)


class PackedStringsBuilder:
    """Appends strings one by one into a growing UTF-8 buffer, in constant memory per string."""

    def __init__(self):
        self._buffer = bytearray()
        self._ends = array("q")

    def append(self, text: str) -> None:
        self._buffer += text.encode("utf-8")
        self._ends.append(len(self._buffer))

    def __len__(self) -> int:
        return len(self._ends)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """`{name + "_ends": offsets, name + "_bytes": buffer}`, what `PackedStrings.from_arrays`
        takes back."""
        ends = np.frombuffer(self._ends, dtype=np.int64) if self._ends else np.zeros(0, np.int64)
        return {
            f"{name}_ends": ends.astype(smallest_offset_dtype(len(self._buffer))),
            f"{name}_bytes": np.frombuffer(bytes(self._buffer), dtype=np.uint8),
        }


class PackedStrings:
    """An immutable sequence of strings stored as one UTF-8 buffer plus end offsets."""

    def __init__(self, strings: Iterable[str]):
        builder = PackedStringsBuilder()
        for text in strings:
            builder.append(text)
        arrays = builder.arrays("s")
        self._ends, self._buffer = arrays["s_ends"], arrays["s_bytes"]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], name: str) -> "PackedStrings":
        packed = cls.__new__(cls)
        packed._ends, packed._buffer = arrays[f"{name}_ends"], arrays[f"{name}_bytes"]
        return packed

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        index %= len(self)
        start = int(self._ends[index - 1]) if index > 0 else 0
        return self._buffer[start : int(self._ends[index])].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def slice(self, start: int, stop: int) -> list[str]:
        """Strings `start` to `stop` at once: one decode for the whole range when it is ASCII,
        many times faster than item by item (the existence check walks millions of paths)."""
        stop = min(stop, len(self))
        if start >= stop:
            return []
        first = int(self._ends[start - 1]) if start > 0 else 0
        chunk = self._buffer[first : int(self._ends[stop - 1])].tobytes()
        if not chunk.isascii():
            return [self[i] for i in range(start, stop)]
        text = chunk.decode("ascii")
        ends = (self._ends[start:stop].astype(np.int64) - first).tolist()
        return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


class PackedPathsBuilder:
    """Appends file paths, storing each folder once: a dataset's millions of paths mostly share a
    few folders, so a path costs its file name plus a 4-byte folder number."""

    def __init__(self):
        self._folders: dict[str, int] = {}
        self._folder_names = PackedStringsBuilder()
        self._folder_of = array("I")
        self._names = PackedStringsBuilder()

    def append(self, path: str) -> None:
        cut = path.rfind("/") + 1
        folder = path[:cut]
        number = self._folders.get(folder)
        if number is None:
            number = self._folders[folder] = len(self._folders)
            self._folder_names.append(folder)
        self._folder_of.append(number)
        self._names.append(path[cut:])

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        folder_of = np.frombuffer(self._folder_of, dtype=np.uint32) if self._folder_of else np.zeros(0, np.uint32)
        return {
            **self._folder_names.arrays(f"{name}_folder"),
            **self._names.arrays(f"{name}_name"),
            f"{name}_folder_of": folder_of.copy(),
        }


class PackedPaths:
    """File paths stored as packed folder names, packed file names and a folder number each."""

    def __init__(self, arrays: dict[str, np.ndarray], name: str):
        self._folders = PackedStrings.from_arrays(arrays, f"{name}_folder")
        self._names = PackedStrings.from_arrays(arrays, f"{name}_name")
        self._folder_of = arrays[f"{name}_folder_of"]

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> str:
        return self._folders[int(self._folder_of[index])] + self._names[index]

    def slice(self, start: int, stop: int) -> list[str]:
        """Paths `start` to `stop` at once (see `PackedStrings.slice`)."""
        folders = self._folders.slice(0, len(self._folders)) if len(self._folders) < 4096 else None
        names = self._names.slice(start, stop)
        numbers = self._folder_of[start : start + len(names)].tolist()
        if folders is None:
            return [self._folders[f] + n for f, n in zip(numbers, names)]
        return [folders[f] + n for f, n in zip(numbers, names)]
