"""Millions of strings in two numpy arrays instead of millions of Python objects.

A DataLoader worker forked from the main process shares its memory copy-on-write, but merely
reading a Python `str` writes its reference count, so a list of 10M captions ends up copied into
every worker. Two flat arrays have no per-string objects and stay shared.
"""

from typing import Iterable

import numpy as np


class PackedStrings:
    """An immutable sequence of strings stored as one UTF-8 buffer plus end offsets."""

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        index %= len(self)
        start = int(self._ends[index - 1]) if index > 0 else 0
        return self._buffer[start:int(self._ends[index])].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))
