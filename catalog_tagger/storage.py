"""fsspec helpers: one filesystem per (protocol, options) per process, URI joins, atomic writes, retries."""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote_to_bytes

import fsspec
from fsspec import AbstractFileSystem

from catalog_tagger.errors import RayJobFailed, ReadRefused, UserError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_ATTEMPTS = 5
# "This request is wrong", not "the store hiccupped": retrying only delays the failure.
_PERMANENT = (
    FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, UserError, ReadRefused
)  # fmt: skip
_PERMANENT_ERRNOS = {errno.EINVAL, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST, errno.EROFS, errno.ENOSPC}
# Transient failures by class name, so that classifying one imports neither Ray nor botocore/aiohttp/urllib3:
# connection and timeout errors of the HTTP clients, and Ray's head/worker/actor/object losses.
_TRANSIENT_NAMES = re.compile(
    r"Connection|Timeout|ServerDisconnected|ClientOSError|ClientPayloadError|ResponseParserError|IncompleteRead"
    r"|RaySystemError|ActorDied|ActorUnavailable|NodeDied|ObjectLost|ObjectFetchTimedOut|OwnerDied|WorkerCrashed"
    r"|RpcError"
)
_TRANSIENT_TEXT = (
    "SlowDown",
    "503",
    "500",
    "Throttl",
    "RequestTimeout",
    "reset",
    "ServiceUnavailable",
    "InternalError",
)


_FS_CACHE: dict[tuple[str, str], AbstractFileSystem] = {}


def protocol_of(uri: str) -> str:
    """The fsspec protocol of ``uri`` (``file`` for a bare path)."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a local file (a bare path or ``file://``)."""
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
    """Path as the filesystem wants it (no scheme for s3/gs/memory; absolute, normalised path for local).

    A ``file://`` URL is read as RFC 8089 says: its host must be empty or ``localhost``, and its path is
    percent-decoded (so the escaped uri of a name that is not UTF-8, see ``local_uri``, reads that very file).
    A bare path and ``local://`` are taken literally. ``..``, ``.`` and repeated ``/`` are resolved lexically.
    """
    if is_local(uri):
        path = _file_url_path(uri) if uri.startswith("file://") else uri.removeprefix("local://")
        path = os.path.abspath(path)
        return "/" + path.lstrip("/") if path.startswith("//") else path  # POSIX keeps a leading '//'; Linux: '/'
    return uri.split("://", 1)[1] if protocol_of(uri) not in ("http", "https") else uri


def _file_url_path(uri: str) -> str:
    """The local path a ``file://`` URL names: ``file:///x`` and ``file://localhost/x`` are both ``/x``."""
    host, slash, path = uri.removeprefix("file://").partition("/")
    if host.lower() not in ("", "localhost"):
        raise UserError(
            f"{redact(uri)!r} names host {host!r}: a file:// uri must be file:///path or file://localhost/path "
            "(a file on another machine cannot be read; mount it, or give a bare path)"
        )
    path = slash + path
    return os.fsdecode(unquote_to_bytes(path)) if "%" in path else path


def local_uri(path: str) -> str:
    """The one uri of a local file, as listings and outputs spell it: its absolute, normalised path.

    A name that is not valid UTF-8 (read from the disk as surrogate escapes) cannot be stored as text; its uri is
    a ``file://`` URL instead, with each such byte and every ``%`` percent-encoded (``file:///d/caf%E9.jpg``):
    unambiguous, and ``strip`` turns it back into the same bytes.
    """
    path = strip(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        escaped = "".join(_escape_char(c) for c in path)
        return "file://" + escaped
    return path


def _escape_char(c: str) -> str:
    if c == "%":
        return "%25"
    if "\udc80" <= c <= "\udcff":  # surrogateescape: the byte 0x80..0xff
        return f"%{ord(c) - 0xDC00:02X}"
    return c


def unstrip(proto: str, path: str) -> str:
    """The inverse of ``strip``: a URI users see in outputs (``local_uri`` for local files)."""
    if proto in ("file", "local"):
        return local_uri(path)
    if proto in ("http", "https"):
        return path
    return f"{proto}://{path}"


def join(uri: str, *parts: str) -> str:
    """``uri`` with path ``parts`` appended, in the form users see (see ``unstrip``)."""
    if is_local(uri):
        return os.path.join(strip(uri), *parts)
    proto = protocol_of(uri)
    return unstrip(proto, posixpath.join(strip(uri), *parts))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at ``uri`` (no retry: callers that want one wrap it in ``retry_transient``)."""
    data: bytes = filesystem(uri, storage_options).cat_file(strip(uri))
    return data


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` first, then its causes and contexts, and the user exception a Ray ``RayTaskError`` wraps."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        cause = getattr(e, "cause", None)
        todo += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]
    return out


def _verdict(err: BaseException) -> bool | None:
    """Whether this one exception is worth a retry; None when it says nothing either way."""
    if isinstance(err, RayJobFailed):
        return err.retryable
    if isinstance(err, _PERMANENT) or (isinstance(err, OSError) and err.errno in _PERMANENT_ERRNOS):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return True
    if any(_TRANSIENT_NAMES.search(t.__name__) for t in type(err).__mro__):
        return True
    text = f"{type(err).__name__} {err}"
    return True if any(s in text for s in _TRANSIENT_TEXT) else None


def is_transient(err: BaseException) -> bool:
    """True for failures worth a retry: store throttling, 5xx, resets, timeouts, lost Ray workers or connections,
    a Ray job that may succeed again. Never for bad input (a ``UserError`` anywhere in the chain) or a missing or
    refused path. The first exception of the chain (see ``exception_chain``) that says either way decides.
    """
    chain = exception_chain(err)
    if any(isinstance(e, UserError) for e in chain):
        return False
    for e in chain:
        verdict = _verdict(e)
        if verdict is not None:
            return verdict
    return False


def is_storage_error(err: BaseException) -> bool:
    """An error raised by the store (as opposed to a bug in our code): OSErrors and transient client errors."""
    return isinstance(err, OSError) or is_transient(err)


def retry_transient(
    fn: Callable[[], T], what: str, *, attempts: int = RETRY_ATTEMPTS, delay: float = 0.2, deadline: float | None = None
) -> T:
    """Call ``fn``, retrying transient store errors with jittered exponential backoff (on top of s3fs/botocore's
    own retries, for faults that outlast them). ``fn`` must be idempotent: a retried PUT may have landed already.
    With a ``deadline`` (``time.monotonic()``), no retry starts after it: retries never stretch a bounded read.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # classified below: transient ones are retried
            late = deadline is not None and time.monotonic() + 2 * delay >= deadline
            if attempt == attempts or late or not is_transient(err):
                raise
            shown = redact(f"{what} failed ({type(err).__name__}: {err})")  # a url in either may carry a password
            log.warning("%s, retry %d/%d", shown, attempt, attempts - 1)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write so that readers see the whole object or nothing.

    Local: write a hidden temp file in the same folder, fsync, ``os.replace``. Object stores: a PUT of the
    complete body is atomic already; we never stream into the final key (s3fs uploads a truncated object
    when an exception interrupts ``with fs.open(..., "wb")``). Transient errors are retried (the write is
    idempotent).
    """
    fs = filesystem(uri, storage_options)
    path = strip(uri)
    if is_local(uri):
        retry_transient(lambda: _write_local_atomic(path, data), f"write {uri}")
    else:
        retry_transient(lambda: fs.pipe_file(path, data), f"write {uri}")


def _write_local_atomic(path: str, data: bytes) -> None:
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


def create_exclusive(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Create ``uri`` with ``data`` only if it does not exist; False when it does (the basis of the commit lock).

    Local: ``O_CREAT | O_EXCL``. S3: a conditional PUT (``If-None-Match: *``, s3fs ``mode="create"``). Other
    stores: whatever their fsspec ``pipe_file(mode="create")`` does (not verified here). A retried create whose
    first attempt landed returns False: the caller recognises its own lock by the token in ``data``.
    """
    path = strip(uri)
    if is_local(uri):

        def create() -> bool:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True

        return retry_transient(create, f"create {uri}")
    fs = filesystem(uri, storage_options)

    def put() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    return retry_transient(put, f"create {uri}")


def within_root(uri: str, root: str) -> bool:
    """Whether ``uri`` stays inside ``root`` once ``..`` and symlinks are resolved (local root), or lies under the
    ``root`` prefix of the same store with no ``.``/``..`` segments (object-store root). Other schemes: False.
    """
    try:
        if is_local(root):
            if not is_local(uri):
                return False
            real = os.path.realpath(strip(uri))
            real_root = os.path.realpath(strip(root))
            return os.path.commonpath([real, real_root]) == real_root
        if protocol_of(uri) != protocol_of(root):
            return False
        path, prefix = strip(uri), strip(root).rstrip("/")
        return not any(seg in (".", "..") for seg in path.split("/")) and path.startswith(prefix + "/")
    except (ValueError, OSError):  # embedded NUL, unresolvable path: not provably inside
        return False


# scheme://user:password@ (greedy up to the authority's last '@': a password may hold a raw '@')
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#\s'\"]*)@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@`` (credentials in a URL must
    not reach logs, manifests or error rows); a uri, or any message that may quote one."""
    return _USERINFO.sub(r"\1***@", text)


def split_userinfo(uri: str) -> tuple[str, str | None]:
    """(``uri`` without ``user:password@``, the userinfo or None). Local paths never carry one."""
    m = _USERINFO.match(uri)
    if m is None or is_local(uri):
        return uri, None
    return m.group(1) + uri[m.end() :], m.group(2)


def origin(uri: str) -> str:
    """``scheme://host[:port]`` of a uri without userinfo: the unit credentials are given for."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0].lower()}"


def with_userinfo(uri: str, credentials: Mapping[str, str]) -> str:
    """``uri`` with the userinfo ``credentials`` holds for its origin put back, for the read only."""
    if not credentials or is_local(uri):
        return uri
    userinfo = credentials.get(origin(uri))
    if userinfo is None:
        return uri
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{userinfo}@{rest}"


def read_uri_table(
    uri: str, storage_options: dict[str, Any] | None = None, *, what: str = "table", strings: bool = False
) -> pa.Table:
    """A table a user points us at (a tagging manifest, a labels table): CSV by extension, Parquet otherwise.

    CSV is ``.csv``, ``.csv.gz`` or ``.tsv``. ``strings=True`` reads every CSV column as text with empty cells
    null, so that values such as ``01`` or ``true`` stay as written. A missing or unreadable file is a UserError
    naming ``what``; transient store errors are retried, then raised as they are (the caller may retry the run).
    """
    import gzip
    import zlib

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    shown = redact(uri)
    try:
        data = retry_transient(lambda: read_bytes(uri, storage_options), f"read {shown}")
    except FileNotFoundError:
        raise UserError(f"{what} {shown!r} not found") from None
    except OSError as err:
        if is_transient(err):
            raise
        raise UserError(f"{what} {shown!r} cannot be read: {err}") from None
    name = uri.lower().split("?", 1)[0]
    csv = name.endswith((".csv", ".csv.gz", ".tsv"))
    try:
        # A copy in Arrow's own memory: Arrow's pool threads may drop the last reference to the buffer while the
        # interpreter exits (a refused manifest exits at once); freeing a buffer over Python bytes then takes the
        # GIL, and the thread is killed inside C++: "terminate called without an active exception", exit 134.
        out = pa.BufferOutputStream()
        out.write(gzip.decompress(data) if csv and name.endswith(".gz") else data)
        buf = out.getvalue()
        if not csv:
            return pq.read_table(pa.BufferReader(buf))
        parse = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
        convert = pacsv.ConvertOptions()
        if strings:
            names = pacsv.open_csv(pa.BufferReader(buf), parse_options=parse).schema.names
            text = dict.fromkeys(names, pa.string())
            convert = pacsv.ConvertOptions(column_types=text, null_values=[""], strings_can_be_null=True)
        return pacsv.read_csv(pa.BufferReader(buf), parse_options=parse, convert_options=convert)
    except (OSError, ValueError, EOFError, zlib.error) as err:  # ArrowInvalid is a ValueError; bad gzip: the rest
        raise UserError(f"{what} {shown!r} cannot be read ({err}); give a Parquet or CSV file") from None
