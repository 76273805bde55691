"""Files lilt_ds writes: atomically, so that a reader (or a crash) never sees half of one, and into
its cache folder when they are derived once and reused (converted weights, demo data, indexes)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

CACHE_ENV = "LILT_DS_CACHE"
"""Where lilt_ds keeps what it derives once and reuses; default ~/.cache/lilt_ds."""


def cache_folder() -> str:
    """``$LILT_DS_CACHE``, else ~/.cache/lilt_ds, as an absolute path (not created here)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "lilt_ds")))


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a scratch path beside ``path``; when the block succeeds it replaces ``path`` in one
    rename (atomic on one filesystem), when it fails the scratch file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    os.close(handle)
    try:
        yield scratch
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except BaseException:
        if os.path.exists(scratch):
            os.unlink(scratch)
        raise


@contextlib.contextmanager
def advisory_lock(path: str, create: bool = False):
    """An exclusive advisory lock (flock) on ``path`` for the block: the processes of one machine take
    turns. ``path`` is opened for reading only (a user's read-only file serves), created empty if
    ``create``. Where the file system offers no flock, the block runs unlocked: callers must stay
    safe then (atomic renames, decisions every process reaches alike)."""
    handle = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)
