"""Where images come from: a prefix listed with fsspec, or a manifest table with a ``uri`` column.

Every uri is normalised once, here, and only here: a local file has one spelling (``storage.local_uri``: the
absolute path with ``.``, ``..`` and ``//`` resolved, a ``file://`` URL only for a name that is not UTF-8), an
object-store key is kept exactly as written (``a//b`` and ``a/b`` are two keys), and ``user:password@`` is taken
out of every uri (kept in memory for the read, never stored). Later stages compare uris as plain strings.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa

from catalog_tagger.decode import IMAGE_EXTENSIONS
from catalog_tagger.errors import UserError
from catalog_tagger.schema import LISTING_SCHEMA, SKIP_REASONS
from catalog_tagger.storage import (
    filesystem,
    is_local,
    is_transient,
    local_uri,
    origin,
    protocol_of,
    read_uri_table,
    redact,
    split_userinfo,
    strip,
    unstrip,
    within_root,
)

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
_SHOW = 3  # folders named in a note


@dataclass
class Listing:
    """The images a run considers, one row each, plus what was left out and why."""

    table: pa.Table  # LISTING_SCHEMA, unique uris, sorted
    skipped_non_image: int = 0  # files under a prefix without an image extension (or hidden)
    duplicates: int = 0  # repeated uris in a manifest (each is tagged once)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))  # by SKIP_REASONS
    notes: list[str] = field(default_factory=list)
    # origin (scheme://host:port) -> "user:password" taken out of manifest uris: for the read only, never stored
    credentials: dict[str, str] = field(default_factory=dict, repr=False)


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def _as_datetime(v: Any) -> datetime | None:
    """A modification time: a datetime or date (UTC when naive), epoch seconds, or ISO-8601 / numeric text."""
    if v is None:
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day, tzinfo=UTC)
    if isinstance(v, int | float | Decimal) and not isinstance(v, bool) and math.isfinite(v):
        return datetime.fromtimestamp(float(v), tz=UTC)
    if isinstance(v, str):
        try:
            return _as_datetime(float(v))
        except ValueError:
            pass
        try:
            d = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(v) from None
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    raise ValueError(v)


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5_hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


def _mtime(info: dict[str, Any]) -> datetime | None:
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        if info.get(key) is not None:
            try:
                return _as_datetime(info[key])
            except (ValueError, ArithmeticError, OSError):
                return None
    return None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------- a prefix
@dataclass
class _Found:
    """What a walk of a prefix found: image files (listing columns) and what it left out."""

    rows: dict[str, tuple[int | None, str | None, datetime | None]] = field(default_factory=dict)
    non_image: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    unreadable: list[str] = field(default_factory=list)  # sub-folders that could not be listed
    escaped: int = 0  # names that are not UTF-8, listed under a file:// uri

    def listing(self) -> Listing:
        uris = sorted(self.rows)
        cols = {c: [self.rows[u][i] for u in uris] for i, c in enumerate(("size", "etag", "mtime"))}
        table = pa.table({"uri": uris, **cols}, schema=LISTING_SCHEMA)
        listing = Listing(table=table, skipped_non_image=self.non_image, skipped=self.skipped)
        listing.notes.extend(self._notes())
        return listing

    def _notes(self) -> list[str]:
        notes = []
        if self.non_image:
            notes.append(f"{self.non_image} file(s) without an image extension skipped")
        if self.unreadable:
            shown = ", ".join(self.unreadable[:_SHOW]) + (" ..." if len(self.unreadable) > _SHOW else "")
            notes.append(
                f"{len(self.unreadable)} sub-folder(s) could not be listed, their images are not tagged: {shown}"
            )
        odd = {r: n for r, n in self.skipped.items() if n and r != "unreadable_folder"}
        if odd:
            kinds = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in odd.items())
            notes.append(
                f"{sum(odd.values())} entries that are not regular files skipped ({kinds}); symlinks are not followed:"
                " a target inside the prefix is tagged under its own path, one outside is not (list it in a manifest)"
            )
        if self.escaped:
            notes.append(f"{self.escaped} file name(s) not valid UTF-8: listed as percent-escaped file:// uris")
        return notes


def _walk_local(root: str) -> _Found:
    """Every entry under a local folder, without following symlinks; each one that is not a regular file is
    counted by reason, each sub-folder that cannot be listed or searched too (the walk goes on)."""
    found = _Found()
    real_root = os.path.realpath(root)
    todo = [root]
    while todo:
        folder = todo.pop()
        try:
            entries = _entries(folder)
        except OSError:
            if folder == root:
                raise
            found.skipped["unreadable_folder"] += 1
            found.unreadable.append(local_uri(folder))
            continue
        for path, name, st in entries:
            if stat.S_ISDIR(st.st_mode):
                todo.append(path)
            elif not stat.S_ISREG(st.st_mode):
                found.skipped[_reason(path, st.st_mode, real_root)] += 1
            elif not _is_image_name(name):
                found.non_image += 1
            else:
                uri = local_uri(path)
                found.escaped += uri.startswith("file://")
                found.rows[uri] = (st.st_size, None, datetime.fromtimestamp(st.st_mtime, tz=UTC))
    found.unreadable.sort()
    return found


def _entries(folder: str) -> list[tuple[str, str, os.stat_result]]:
    """(path, name, lstat) of each entry of ``folder``; OSError when the folder cannot be read or searched."""
    out = []
    with os.scandir(folder) as it:
        for entry in it:
            try:
                out.append((entry.path, entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue  # removed since the folder was read
    return out


def _reason(path: str, mode: int, real_root: str) -> str:
    """Why an entry that is not a regular file or a folder is not tagged (one of SKIP_REASONS)."""
    if stat.S_ISLNK(mode):
        if not os.path.exists(path):
            return "broken_symlink"
        target = os.path.realpath(path)
        return "symlink_inside" if os.path.commonpath([target, real_root]) == real_root else "symlink_outside"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


def _find_store(source: str, storage_options: dict[str, Any] | None) -> _Found:
    """Every object under an object-store prefix (keys as the store spells them)."""
    proto = protocol_of(source)
    found = _Found()
    for path, info in filesystem(source, storage_options).find(strip(source), detail=True).items():
        if info.get("type", "file") != "file":
            continue
        if not _is_image_name(os.path.basename(path)):
            found.non_image += 1
            continue
        found.rows[unstrip(proto, path)] = (info.get("size"), _etag(info), _mtime(info))
    return found


def list_prefix(source: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """Recursively list image files under a local directory or an object-store prefix."""
    fs = filesystem(source, storage_options)
    root = strip(source)
    try:
        if not fs.exists(root):
            raise UserError(f"source {redact(source)!r} does not exist or is not readable")
        if fs.isfile(root):
            raise UserError(
                f"source {redact(source)!r} is a single file: give a folder/prefix or a .csv/.parquet manifest"
            )
        found = _walk_local(root) if is_local(source) else _find_store(source, storage_options)
    except (PermissionError, OSError) as err:
        if isinstance(err, UserError) or is_transient(err):
            raise  # transient: retryable by the caller, not bad input
        raise UserError(f"cannot list source {redact(source)!r}: {err}") from None
    return found.listing()


# --------------------------------------------------------------------------------------------- a manifest
def resolve_uri(uri: str, base: str) -> str:
    """Manifest URIs may be absolute (any scheme) or relative to the manifest's folder. A local file comes out in
    its one spelling (``local_uri``); an object-store key exactly as written."""
    if "://" in uri:
        return local_uri(uri) if is_local(uri) else uri
    if os.path.isabs(uri):
        return local_uri(uri)
    if is_local(base):
        return local_uri(os.path.join(os.path.dirname(strip(base)), uri))
    proto = protocol_of(base)
    folder = strip(base).rsplit("/", 1)[0]
    return unstrip(proto, f"{folder}/{uri}")


def _whole(v: Any) -> int:
    """A size: a whole number of bytes, as a number or as text ("12", "12.0")."""
    n = Decimal(v.strip()) if isinstance(v, str) else v
    if isinstance(n, bool) or not isinstance(n, int | float | Decimal) or not math.isfinite(n) or n != int(n) or n < 0:
        raise ValueError(v)
    return int(n)


def _text(v: Any) -> str:
    """An ETag: text, or a whole number (a CSV reader's guess for an all-digit ETag), without its quotes."""
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise ValueError(v)
    return str(v).strip('"')


# column -> (convert one value, the Arrow types accepted, what the column must hold)
_COLUMNS: dict[str, tuple[Callable[[Any], Any], tuple[str, ...], str]] = {
    "uri": (str, ("string",), "text"),
    "size": (_whole, ("integer", "floating", "decimal", "string"), "whole numbers of bytes"),
    "etag": (_text, ("integer", "string"), "text (an ETag)"),
    "mtime": (_as_datetime, ("timestamp", "date", "integer", "floating", "decimal", "string"), "times (ISO-8601 "
              "text, or seconds since 1970)"),
}  # fmt: skip


def _kind(typ: pa.DataType) -> str:
    for kind in ("integer", "floating", "decimal", "timestamp", "date", "null"):
        if getattr(pa.types, f"is_{kind}")(typ):
            return kind
    return "string" if pa.types.is_string(typ) or pa.types.is_large_string(typ) else str(typ)


def _column(raw: pa.Table, name: str, source: str) -> list[Any]:
    """The manifest's ``name`` column as Python values (all None when absent); a value or a type that does not fit
    is a ``UserError`` naming the column, the row and the value."""
    if name not in raw.column_names:
        return [None] * raw.num_rows
    values = raw.column(name).to_pylist()
    convert, kinds, what = _COLUMNS[name]
    kind = _kind(raw.schema.field(name).type)
    if kind not in (*kinds, "null"):
        raise UserError(f"manifest {redact(source)!r}: column {name!r} has type {kind}; it must hold {what}")
    out = []
    for row, v in enumerate(values, start=1):
        try:
            out.append(None if v is None or v == "" else convert(v))
        except (ValueError, TypeError, ArithmeticError, OSError):  # OSError, OverflowError: a time out of range
            raise UserError(
                f"manifest {redact(source)!r}: column {name!r} must hold {what}; row {row} has {v!r}"
            ) from None
    return out


def read_manifest(source: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """A CSV/Parquet table with a ``uri`` column; optional ``size``/``etag``/``mtime`` are kept (checked first)."""
    raw = read_uri_table(source, storage_options, what="manifest", strings=True)
    if "uri" not in raw.column_names:
        raise UserError(f"manifest {redact(source)!r} has no 'uri' column (columns: {', '.join(raw.column_names)})")
    uris, sizes, etags, mtimes = (_column(raw, c, source) for c in ("uri", "size", "etag", "mtime"))
    rows: dict[str, tuple[int | None, str | None, datetime | None]] = {}
    credentials: dict[str, str] = {}
    duplicates = blanks = 0
    for i, u in enumerate(uris):
        if u is None or not u.strip():
            blanks += 1
            continue
        uri, userinfo = split_userinfo(resolve_uri(u.strip(), source))
        if userinfo is not None:
            _remember(credentials, uri, userinfo, source)
        if uri in rows:
            duplicates += 1
            continue
        rows[uri] = (sizes[i], etags[i], mtimes[i])
    found = _Found(rows=rows)
    listing = found.listing()
    listing.duplicates, listing.credentials = duplicates, credentials
    if duplicates:
        listing.notes.append(f"{duplicates} duplicate uri(s) in the manifest: each image is tagged once")
    if blanks:
        listing.notes.append(f"{blanks} blank uri(s) in the manifest ignored")
    if credentials:
        listing.notes.append(
            f"credentials (user:password@) in the uris of {len(credentials)} server(s): used to read, not stored"
        )
    return listing


def _remember(credentials: dict[str, str], uri: str, userinfo: str, source: str) -> None:
    """Keep one ``user:password`` per server; two different ones for the same server cannot both be honoured."""
    key = origin(uri)
    if credentials.setdefault(key, userinfo) != userinfo:
        raise UserError(
            f"manifest {redact(source)!r}: uris of {key} carry different credentials (user:password@); "
            "give one per server"
        )


def list_source(source: str, storage_options: dict[str, Any] | None = None, *, limit: int | None = None) -> Listing:
    """List a prefix or read a manifest; ``limit`` keeps the first N uris (sorted) for trial runs."""
    listing = read_manifest(source, storage_options) if is_manifest(source) else list_prefix(source, storage_options)
    if limit is not None and listing.table.num_rows > limit:
        listing.table = listing.table.slice(0, limit)
    notes = "; " + "; ".join(listing.notes) if listing.notes else ""
    log.info("source %s: %d image(s)%s", redact(source), listing.table.num_rows, notes)
    return listing


def refuse_outside_root(listing: Listing, source: str, root: str, *, show: int = 10) -> None:
    """Refuse the whole run when any listed uri escapes ``root`` (absolute paths elsewhere, ``..``, symlinks that
    resolve outside, other schemes): a manifest pointing outside is a configuration or security error, so nothing
    is tagged, rather than tagging the rest and hiding the problem in error rows.
    """
    bad = [u for u in listing.table.column("uri").to_pylist() if not within_root(u, root)]
    if not bad:
        return
    shown = ", ".join(repr(redact(u)) for u in bad[:show]) + (f" and {len(bad) - show} more" if len(bad) > show else "")
    raise UserError(
        f"{redact(source)}: {len(bad)} image uri(s) outside the allowed root {root!r} (absolute paths elsewhere, "
        f"'..', symlinks leading out, or another scheme): {shown}. Nothing was tagged: fix the manifest or the root"
    )
