"""fsspec helpers: one filesystem per (protocol, options) per process, URI joins, atomic writes."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

_FS_CACHE: dict[tuple[str, str], AbstractFileSystem] = {}


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> AbstractFileSystem:
    """The fsspec filesystem for ``uri``, cached per process (s3fs sessions are expensive to make)."""
    proto = protocol_of(uri)
    key = (proto, json.dumps(storage_options or {}, sort_keys=True, default=str))
    fs = _FS_CACHE.get(key)
    if fs is None:
        fs = fsspec.filesystem(proto, **(storage_options or {}))
        _FS_CACHE[key] = fs
    return fs


def strip(uri: str) -> str:
    """Path as the filesystem wants it (no scheme for s3/gs/memory; absolute path for local)."""
    if is_local(uri):
        path = uri.removeprefix("file://").removeprefix("local://")
        return os.path.abspath(path)
    return uri.split("://", 1)[1] if protocol_of(uri) not in ("http", "https") else uri


def unstrip(proto: str, path: str) -> str:
    """The inverse of ``strip``: a URI users see in outputs (absolute path for local files)."""
    if proto in ("file", "local"):
        return path
    if proto in ("http", "https"):
        return path
    return f"{proto}://{path}"


def join(uri: str, *parts: str) -> str:
    if is_local(uri):
        return os.path.join(strip(uri), *parts)
    proto = protocol_of(uri)
    return unstrip(proto, posixpath.join(strip(uri), *parts))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs = filesystem(uri, storage_options)
    return fs.cat_file(strip(uri))


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write so that readers see the whole object or nothing.

    Local: write a hidden temp file in the same folder, fsync, ``os.replace``. Object stores: a PUT of the
    complete body is atomic already; we never stream into the final key (s3fs uploads a truncated object
    when an exception interrupts ``with fs.open(..., "wb")``).
    """
    fs = filesystem(uri, storage_options)
    path = strip(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    return filesystem(uri, storage_options).exists(strip(uri))


def move(src: str, dst: str, storage_options: dict[str, Any] | None = None) -> None:
    fs = filesystem(src, storage_options)
    if is_local(src):
        os.makedirs(os.path.dirname(strip(dst)), exist_ok=True)
        os.replace(strip(src), strip(dst))
    else:
        fs.mv(strip(src), strip(dst))
