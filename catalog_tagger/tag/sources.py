"""Where images come from: a prefix listed with fsspec, or a manifest table with a ``uri`` column."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from catalog_tagger.decode import IMAGE_EXTENSIONS
from catalog_tagger.errors import UserError
from catalog_tagger.schema import LISTING_SCHEMA
from catalog_tagger.storage import (
    filesystem,
    is_local,
    is_transient,
    protocol_of,
    read_uri_table,
    redact,
    strip,
    unstrip,
    within_root,
)

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass
class Listing:
    """The images a run considers, one row each, plus what was left out and why."""

    table: pa.Table  # LISTING_SCHEMA, unique uris, sorted
    skipped_non_image: int = 0  # files under a prefix without an image extension
    duplicates: int = 0  # repeated uris in a manifest (each is tagged once)
    notes: list[str] = field(default_factory=list)


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def _as_datetime(v: Any) -> datetime | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, int | float):
        return datetime.fromtimestamp(float(v), tz=UTC)
    if isinstance(v, str):
        try:
            d = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    return None


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5_hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


def _mtime(info: dict[str, Any]) -> datetime | None:
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        if info.get(key) is not None:
            return _as_datetime(info[key])
    return None


def list_prefix(source: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """Recursively list image files under a local directory or an object-store prefix."""
    proto = protocol_of(source)
    fs = filesystem(source, storage_options)
    root = strip(source)
    try:
        if not fs.exists(root):
            raise UserError(f"source {source!r} does not exist or is not readable")
        if fs.isfile(root):
            raise UserError(f"source {source!r} is a single file: give a folder/prefix or a .csv/.parquet manifest")
        found = fs.find(root, detail=True)
    except (PermissionError, OSError) as err:
        if isinstance(err, UserError) or is_transient(err):
            raise  # transient: retryable by the caller, not bad input
        raise UserError(f"cannot list source {source!r}: {err}") from None
    uris, sizes, etags, mtimes = [], [], [], []
    skipped = 0
    for path, info in sorted(found.items()):
        if info.get("type", "file") != "file":
            continue
        name = os.path.basename(path)
        if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
            skipped += 1
            continue
        uris.append(unstrip(proto, path))
        sizes.append(info.get("size"))
        etags.append(_etag(info))
        mtimes.append(_mtime(info))
    table = pa.table({"uri": uris, "size": sizes, "etag": etags, "mtime": mtimes}, schema=LISTING_SCHEMA)
    listing = Listing(table=table, skipped_non_image=skipped)
    if skipped:
        listing.notes.append(f"{skipped} file(s) without an image extension skipped")
    return listing


def resolve_uri(uri: str, base: str) -> str:
    """Manifest URIs may be absolute (any scheme) or relative to the manifest's folder."""
    if "://" in uri:
        return uri.removeprefix("file://") if uri.startswith("file://") else uri
    if os.path.isabs(uri):
        return uri
    if is_local(base):
        return os.path.normpath(os.path.join(os.path.dirname(strip(base)), uri))
    proto = protocol_of(base)
    folder = strip(base).rsplit("/", 1)[0]
    return unstrip(proto, f"{folder}/{uri}")


def read_manifest(source: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """A CSV/Parquet table with a ``uri`` column; optional ``size``/``etag``/``mtime`` are kept."""
    raw = read_uri_table(source, storage_options, what="manifest")
    if "uri" not in raw.column_names:
        raise UserError(f"manifest {source!r} has no 'uri' column (columns: {', '.join(raw.column_names)})")
    uris = raw.column("uri").to_pylist()
    cols = {c: raw.column(c).to_pylist() if c in raw.column_names else [None] * len(uris) for c in ("size", "etag")}
    mt = raw.column("mtime").to_pylist() if "mtime" in raw.column_names else [None] * len(uris)
    seen: dict[str, int] = {}
    rows_uri, rows_size, rows_etag, rows_mtime = [], [], [], []
    duplicates = blanks = 0
    for i, u in enumerate(uris):
        if u is None or not str(u).strip():
            blanks += 1
            continue
        r = resolve_uri(str(u).strip(), source)
        if r in seen:
            duplicates += 1
            continue
        seen[r] = i
        rows_uri.append(r)
        size = cols["size"][i]
        rows_size.append(int(size) if size is not None else None)
        etag = cols["etag"][i]
        rows_etag.append(str(etag).strip('"') if etag is not None else None)
        rows_mtime.append(_as_datetime(mt[i]))
    order = sorted(range(len(rows_uri)), key=rows_uri.__getitem__)
    table = pa.table(
        {
            "uri": [rows_uri[i] for i in order],
            "size": [rows_size[i] for i in order],
            "etag": [rows_etag[i] for i in order],
            "mtime": [rows_mtime[i] for i in order],
        },
        schema=LISTING_SCHEMA,
    )
    listing = Listing(table=table, duplicates=duplicates)
    if duplicates:
        listing.notes.append(f"{duplicates} duplicate uri(s) in the manifest: each image is tagged once")
    if blanks:
        listing.notes.append(f"{blanks} blank uri(s) in the manifest ignored")
    return listing


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
