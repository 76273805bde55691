"""Images stored as bytes inside a table (a Parquet binary column, a datasets `Image` feature), copied
once into one Arrow IPC file that every process memory-maps; the caption index refers to them by
``stored:<file>#<row>`` in place of a path.
"""

from __future__ import annotations

import io
import os

from ...fileio import cache_folder

PREFIX = "stored:"
_OPEN: dict[str, object] = {}  # store file -> its memory-mapped table, per process


def is_stored(path: str) -> bool:
    return path.startswith(PREFIX)


def store_file(identity: str) -> str:
    """Where the store of a table set identified by ``identity`` (a hash) lives."""
    return os.path.join(cache_folder(), "image-store", f"{identity}.arrow")


class StoreWriter:
    """Appends image bytes to a new store file; ``reference(row)`` names one in the index."""

    def __init__(self, path: str):
        self.path, self.rows, self._writer, self._pending = path, 0, None, []

    def add(self, data: bytes) -> str:
        self._pending.append(data)
        self.rows += 1
        if len(self._pending) >= 4096:
            self._flush()
        return f"{PREFIX}{self.path}#{self.rows - 1}"

    def _flush(self) -> None:
        import pyarrow as pa

        if self._writer is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._scratch = f"{self.path}.tmp-{os.getpid()}"
            self._writer = pa.ipc.new_file(self._scratch, pa.schema([("image", pa.binary())]))
        if self._pending:
            self._writer.write_table(pa.table({"image": pa.array(self._pending, type=pa.binary())}))
            self._pending = []

    def close(self) -> None:
        if self.rows == 0:
            return
        self._flush()
        self._writer.close()
        os.replace(self._scratch, self.path)


def exists(path: str) -> bool:
    """A ``stored:`` reference whose store file exists."""
    return os.path.isfile(path[len(PREFIX) :].rsplit("#", 1)[0])


def stored_image(path: str) -> io.BytesIO:
    """The bytes a ``stored:`` reference names, from the memory-mapped store."""
    import pyarrow as pa

    file, row = path[len(PREFIX) :].rsplit("#", 1)
    table = _OPEN.get(file)
    if table is None:
        table = _OPEN[file] = pa.ipc.open_file(pa.memory_map(file)).read_all()
    return io.BytesIO(table.column(0)[int(row)].as_py())
