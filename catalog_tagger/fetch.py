"""Bounded reads of one image: regular local files only, a size cap enforced while streaming, connect and read
timeouts, and one deadline per object that every retry shares. What is refused raises ``ReadRefused``.

Why each bound: a FIFO blocks ``open`` until a writer comes (forever), ``/dev/zero`` never ends, a server may
accept and never answer (aiohttp's default is 300 s, times five retries) or trickle a byte now and then, and a
2 GB body was read whole into memory before anything looked at it.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem

from catalog_tagger.errors import ReadRefused
from catalog_tagger.storage import RETRY_ATTEMPTS, filesystem, is_local, protocol_of, redact, retry_transient, strip

T = TypeVar("T")

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024**2
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_READ_DEADLINE_S = 120.0
CHUNK_BYTES = 1024**2  # a streamed body arrives (and is counted) in pieces of at most this
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


@dataclass(frozen=True)
class ReadLimits:
    """What reading one object may cost."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # refused as soon as the stream passes this, whatever the size said
    timeout_s: float = DEFAULT_READ_TIMEOUT_S  # HTTP(S): to connect, and the longest silence inside a body
    deadline_s: float = DEFAULT_READ_DEADLINE_S  # the whole read, every retry included


def read_bounded(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    limits: ReadLimits | None = None,
    *,
    attempts: int = RETRY_ATTEMPTS,
) -> bytes:
    """The bytes of the object at ``uri``, within ``limits`` (defaults: 64 MiB, 30 s, 120 s).

    Local: regular files only (a FIFO, a device, a directory or a socket is refused before it is opened).
    HTTP(S): one streamed GET with connect/read timeouts; the body is counted as it arrives. Async object stores
    (s3, gcs...): one ranged GET of at most the cap plus one byte, under the deadline. Other stores: a ranged
    ``cat_file``. Transient errors (a timed-out attempt included) are retried only while the deadline leaves time;
    past it the read is cancelled and refused, never retried.
    """
    limits = limits or ReadLimits()
    deadline = time.monotonic() + limits.deadline_s
    return retry_transient(
        lambda: _read_once(uri, storage_options, limits, deadline),
        f"read {redact(uri)}",
        attempts=attempts,
        deadline=deadline,
    )


def _read_once(uri: str, storage_options: dict[str, Any] | None, limits: ReadLimits, deadline: float) -> bytes:
    """One attempt of ``read_bounded``."""
    if is_local(uri):
        return _read_local(strip(uri), limits, deadline)
    fs = filesystem(uri, storage_options)
    if protocol_of(uri) in ("http", "https"):
        return _on_loop(fs, _http_get(fs, uri, limits), limits, deadline)
    end = limits.max_bytes + 1  # one byte past the cap tells "too large" from "exactly the cap"
    if isinstance(fs, AsyncFileSystem):
        data: bytes = _on_loop(fs, fs._cat_file(strip(uri), start=0, end=end), limits, deadline)
    else:
        data = fs.cat_file(strip(uri), start=0, end=end)
    _Body(limits.max_bytes).add(data)  # the store may have ignored the range
    return data


class _Body:
    """The chunks of one object, refused as soon as they add up to more than the cap."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise _too_large(self.max_bytes)
        self.chunks.append(chunk)

    def room(self) -> int:
        """Bytes to ask for next: up to one past the cap, so that an object of exactly the cap is accepted."""
        return self.max_bytes + 1 - self.size

    def join(self) -> bytes:
        return b"".join(self.chunks)


def _too_large(max_bytes: int) -> ReadRefused:
    return ReadRefused(f"larger than {max_bytes:,} bytes (--max-image-bytes)")


def _late(limits: ReadLimits) -> ReadRefused:
    return ReadRefused(f"no complete answer within {limits.deadline_s:g} s (--read-deadline-s)")


def _regular(mode: int) -> None:
    """Refuse anything but a regular file, naming what it is."""
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise ReadRefused(f"not a regular file ({kind})")


def _read_local(path: str, limits: ReadLimits, deadline: float) -> bytes:
    """A regular file, read in chunks up to the cap. ``stat`` before opening (opening a FIFO blocks, opening a
    device may act on it), ``fstat`` after (the path may have been swapped in between; ``O_NONBLOCK`` keeps even
    that open from blocking)."""
    _regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        _regular(st.st_mode)
        if st.st_size > limits.max_bytes:  # the size alone refuses it (and a file may still grow: _Body counts)
            raise _too_large(limits.max_bytes)
        return _drain(lambda n: os.read(fd, n), _Body(limits.max_bytes), limits, deadline, first=st.st_size + 1)
    finally:
        os.close(fd)


def _drain(read: Callable[[int], bytes], body: _Body, limits: ReadLimits, deadline: float, *, first: int) -> bytes:
    """``read(n)`` until it returns nothing, refusing past the cap or the deadline (checked between chunks)."""
    want = first
    while chunk := read(min(want, body.room())):
        body.add(chunk)
        if time.monotonic() > deadline:
            raise _late(limits)
        want = CHUNK_BYTES
    return body.join()


async def _http_get(fs: AbstractFileSystem, uri: str, limits: ReadLimits) -> bytes:
    """One streamed GET with connect/read timeouts, through the filesystem's own session (its client options and
    request arguments apply; a ``timeout`` among the latter wins over ours)."""
    import aiohttp

    session = await fs.set_session()
    timeout = aiohttp.ClientTimeout(
        total=None, connect=limits.timeout_s, sock_connect=limits.timeout_s, sock_read=limits.timeout_s
    )
    kwargs = {"timeout": timeout, **getattr(fs, "kwargs", {})}
    async with session.get(fs.encode_url(uri), **kwargs) as r:
        if r.status == 404:
            raise FileNotFoundError(redact(uri))
        r.raise_for_status()
        if r.content_length is not None and r.content_length > limits.max_bytes:
            raise _too_large(limits.max_bytes)
        body = _Body(limits.max_bytes)  # counts what arrives, whatever the Content-Length said
        async for chunk in r.content.iter_chunked(CHUNK_BYTES):
            body.add(chunk)
        return body.join()


def _on_loop(fs: AbstractFileSystem, coro: Coroutine[Any, Any, T], limits: ReadLimits, deadline: float) -> T:
    """Run ``coro`` on the filesystem's event loop; past ``deadline`` cancel it and refuse the read.

    A ``TimeoutError`` the coroutine raised itself (an attempt's connect or read timeout) is passed on: transient,
    retried while the deadline allows.
    """
    fut = asyncio.run_coroutine_threadsafe(coro, fs.loop)
    try:
        return fut.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        if fut.done():
            raise
        fut.cancel()
        raise _late(limits) from None
