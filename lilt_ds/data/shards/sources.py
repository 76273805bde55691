"""Where shard bytes come from, as webdataset users write it: local paths, ``pipe:COMMAND`` (opened
by webdataset's own opener) and URLs that fsspec opens (``http(s)://``, ``s3://``, ``gs://``, ...
with that scheme's fsspec backend installed). Every read has a timeout; a remote or piped shard
whose read fails is opened again a bounded number of times, with backoff, and the samples already
delivered are not delivered twice.
"""

from __future__ import annotations

import io
import os
import select
import time
from collections.abc import Iterator
from urllib.parse import urlparse

from ..errors import DataError

LOCAL, PIPE, REMOTE = "local", "pipe", "remote"
BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
"""The wait before the first retry of a shard, doubled for each further one up to the cap."""


def shard_kind(url: str) -> str:
    """LOCAL (a path, or file://), PIPE (pipe:COMMAND) or REMOTE (any other scheme: fsspec's)."""
    if url.startswith("pipe:"):
        return PIPE
    scheme = urlparse(url).scheme
    return LOCAL if scheme in ("", "file") or len(scheme) == 1 else REMOTE  # one letter: a Windows drive


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file://") else url


def check_backend(url: str, setting: str) -> None:
    """A REMOTE url's scheme has an fsspec backend installed; else an error naming the URL and the package."""
    import fsspec

    protocol = urlparse(url).scheme
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:  # fsspec's message names the package, e.g. "Install s3fs to access S3"
        raise DataError(f"{setting}: {url} needs fsspec's {protocol}:// backend: {err}") from None
    except ValueError:
        raise DataError(
            f"{setting}: {url}: no fsspec backend knows {protocol}://; use a local path, pipe:COMMAND, or a URL "
            "scheme fsspec opens (http, https, s3, gs, ...)"
        ) from None


def _fsspec_options(url: str, timeout_s: float) -> dict:
    """Timeouts for the backends whose options we know (no read may wait forever)."""
    protocol = urlparse(url).scheme
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        return {"client_kwargs": {"timeout": timeout}, "block_size": 0}  # streamed: no range requests needed
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s}}
    return {}


def open_shard(url: str, timeout_s: float):
    """A binary stream of the shard at ``url`` (read sequentially)."""
    kind = shard_kind(url)
    if kind == LOCAL:
        return open(local_path(url), "rb")
    if kind == PIPE:
        from webdataset.gopen import gopen

        return io.BufferedReader(_TimedPipe(gopen(url, "rb"), url, timeout_s), buffer_size=1 << 20)
    import fsspec

    return fsspec.open(url, "rb", **_fsspec_options(url, timeout_s)).open()


def read_text(url: str, timeout_s: float) -> str | None:
    """A small text file (a counts file beside the shards), or None when it does not exist."""
    try:
        if shard_kind(url) == LOCAL:
            with open(local_path(url), encoding="utf-8") as handle:
                return handle.read()
        import fsspec

        with fsspec.open(url, "rt", encoding="utf-8", **_fsspec_options(url, timeout_s)) as handle:
            return handle.read()
    except FileNotFoundError as err:
        cause = err.__cause__  # fsspec's HTTP reports a refused connection as not found, caused by it
        if cause is None or isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) == 404:
            return None
        raise DataError(f"{url} could not be read ({error_text(cause)}): check the address and the network") from None
    except Exception as err:  # noqa: BLE001 - an unreachable host, a refused connection, a server error
        raise DataError(
            f"{url} could not be read ({type(err).__name__}: {err}): check the address and the network"
        ) from None


class _TimedPipe(io.RawIOBase):
    """webdataset's pipe, read with a timeout: a command that sends nothing for ``timeout_s`` is
    killed (TimeoutError); one that ends with a failing status raises webdataset's IOError."""

    def __init__(self, pipe, url: str, timeout_s: float):
        self.pipe, self.url, self.timeout_s = pipe, url, timeout_s
        self.fd = pipe.stream.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            self.pipe.proc.kill()
            raise TimeoutError(f"{self.url}: the command sent nothing for {self.timeout_s:g} s")
        data = os.read(self.fd, len(buffer))
        if not data:
            self.pipe.wait_for_child()  # raises on a failing exit status
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self.pipe.proc.poll() is None:
                self.pipe.proc.kill()
            self.pipe.proc.wait()
            self.pipe.stream.close()
        super().close()


def error_text(err: BaseException) -> str:
    """A one-line account of a read error (an HTTP error as its status, not aiohttp's request dump)."""
    if isinstance(getattr(err, "status", None), int) and hasattr(err, "message"):
        return f"{type(err).__name__}: HTTP {err.status} {err.message}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


class ShardUnreadable(Exception):
    """A remote or piped shard that could not be read to its end in ``attempts`` tries."""

    def __init__(self, url: str, attempts: int, error: BaseException, samples: int):
        self.url, self.attempts, self.error, self.samples = url, attempts, error, samples
        super().__init__(f"{url}: unreadable after {attempts} attempt(s) ({error_text(error)})")


def shard_samples(url: str, retries: int, timeout_s: float, sleep=time.sleep) -> Iterator[dict]:
    """The raw samples of one shard, grouped by webdataset (``__key__``, ``__url__`` and one entry per
    extension). A local file is read once (a read error is damage, raised as is). A remote or piped
    one is opened again up to ``retries`` times after an error, waiting BACKOFF_S, then twice as
    long each time, and continues after the samples it already delivered; then ShardUnreadable."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    attempts = 1 if shard_kind(url) == LOCAL else retries + 1
    delivered = 0
    for attempt in range(attempts):
        try:
            with open_shard(url, timeout_s) as stream:
                for seen, raw in enumerate(group_by_keys(tar_file_expander([{"url": url, "stream": stream}])), 1):
                    if seen > delivered:
                        delivered = seen
                        yield raw
            return
        except Exception as err:  # noqa: BLE001 - network, command and tar errors alike are retried
            if attempts == 1:
                raise
            if attempt + 1 == attempts:
                raise ShardUnreadable(url, attempts, err, delivered) from err
            sleep(min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt))
