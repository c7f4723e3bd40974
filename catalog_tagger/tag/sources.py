"""Where images come from: a prefix walked with fsspec (or ``os.scandir``), or a manifest table with a ``uri`` column
(``manifest.py``), always as a stream of record batches: the driver never holds the listing.

Every uri is normalised once, here (and in ``manifest.py``), and only here: a local file has one spelling
(``storage.local_uri``: the absolute path with ``.``, ``..`` and ``//`` resolved, a ``file://`` URL only for a name
that is not UTF-8), an object-store key is kept exactly as written (``a//b`` and ``a/b`` are two keys), and
``user:password@`` is taken out of every uri (kept in memory for the read, never stored). Later stages compare uris
as plain strings. Uniqueness and order are the diff's job (``diff.py``, out of core).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
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
    protocol_of,
    redact,
    strip,
    unstrip,
    within_root,
)
from catalog_tagger.tag.manifest import as_datetime, read_manifest

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
LIST_BATCH = 65_536  # listing rows per record batch
_SHOW = 3  # folders named in a note

Row = tuple[str, int | None, str | None, datetime | None]  # uri, size, etag, mtime


@dataclass
class Listing:
    """The images a run considers, as a stream, plus what was left out and why.

    ``batches`` (LISTING_SCHEMA, uris neither unique nor sorted) is consumed once, by the diff; the counters and
    notes fill in as it passes, ``listed`` and ``duplicates`` once the diff has made the uris unique (``settle``).
    """

    batches: Iterator[pa.RecordBatch] = field(default_factory=lambda: iter(()), repr=False)
    listed: int = 0  # unique uris the run considers (after ``limit``)
    skipped_non_image: int = 0  # files under a prefix without an image extension (or hidden)
    duplicates: int = 0  # repeated uris in a manifest (each is tagged once)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))  # by SKIP_REASONS
    notes: list[str] = field(default_factory=list)
    # origin (scheme://host:port) -> "user:password" taken out of manifest uris: for the read only, never stored
    credentials: dict[str, str] = field(default_factory=dict, repr=False)

    def settle(self, rows: int, unique: int, listed: int) -> None:
        """The diff's counts: ``rows`` streamed, ``unique`` uris among them, ``listed`` kept (``limit``)."""
        self.listed, self.duplicates = listed, rows - unique
        if self.duplicates:
            self.notes.append(f"{self.duplicates} duplicate uri(s) in the manifest: each image is tagged once")


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5_hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


def _mtime(info: dict[str, Any]) -> datetime | None:
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        if info.get(key) is not None:
            try:
                return as_datetime(info[key])
            except (ValueError, ArithmeticError, OSError):
                return None
    return None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def batched(rows: Iterable[Row]) -> Iterator[pa.RecordBatch]:
    """Listing rows as LISTING_SCHEMA record batches of ``LIST_BATCH`` rows (the last one shorter)."""
    it = iter(rows)
    while chunk := list(islice(it, LIST_BATCH)):
        uris, sizes, etags, mtimes = zip(*chunk, strict=True)
        yield pa.RecordBatch.from_arrays(
            [pa.array(uris, pa.string()), pa.array(sizes, pa.int64()), pa.array(etags, pa.string()),
             pa.array(mtimes, LISTING_SCHEMA.field("mtime").type)],
            schema=LISTING_SCHEMA,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- a prefix
@dataclass
class _Found:
    """What a walk of a prefix left out, counted as it goes."""

    non_image: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    unreadable: list[str] = field(default_factory=list)  # sub-folders that could not be listed
    escaped: int = 0  # names that are not UTF-8, listed under a file:// uri

    def notes(self) -> list[str]:
        notes = []
        if self.non_image:
            notes.append(f"{self.non_image} file(s) without an image extension skipped")
        if self.unreadable:
            shown = sorted(self.unreadable)
            names = ", ".join(shown[:_SHOW]) + (" ..." if len(shown) > _SHOW else "")
            notes.append(f"{len(shown)} sub-folder(s) could not be listed, their images are not tagged: {names}")
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


def _walk_local(root: str, found: _Found) -> Iterator[Row]:
    """Every image under a local folder, folder by folder as ``scandir`` reads it, without following symlinks;
    each entry that is not a regular file is counted by reason, each sub-folder that cannot be listed or searched
    too (the walk goes on; one that fails part way keeps the images already listed)."""
    real_root = os.path.realpath(root)
    todo = [root]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since the folder was read
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
                    elif not stat.S_ISREG(st.st_mode):
                        found.skipped[_reason(entry.path, st.st_mode, real_root)] += 1
                    elif not _is_image_name(entry.name):
                        found.non_image += 1
                    else:
                        uri = local_uri(entry.path)
                        found.escaped += uri.startswith("file://")
                        yield uri, st.st_size, None, datetime.fromtimestamp(st.st_mtime, tz=UTC)
        except OSError:
            if folder == root:
                raise
            found.skipped["unreadable_folder"] += 1
            found.unreadable.append(local_uri(folder))


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


def _walk_store(source: str, storage_options: dict[str, Any] | None, found: _Found) -> Iterator[Row]:
    """Every image under an object-store prefix (keys as the store spells them), page by page."""
    proto = protocol_of(source)
    s3 = proto in ("s3", "s3a")
    for info in _store_entries(filesystem(source, storage_options), strip(source), s3=s3):
        path = info["name"]
        if info.get("type", "file") != "file" or path.endswith("/"):
            continue  # a folder, or S3's zero-byte "folder/" marker
        if not _is_image_name(path.rsplit("/", 1)[-1]):
            found.non_image += 1
            continue
        yield unstrip(proto, path), info.get("size"), _etag(info), _mtime(info)


def _store_entries(fs: Any, root: str, *, s3: bool) -> Iterator[dict[str, Any]]:
    """The entries under ``root``: S3's flat listing one page of keys at a time (s3fs ``_iterdir``: 1,000 keys a
    request); other stores one folder at a time (``ls``). fsspec's ``find`` would hold every key at once."""
    if s3 and hasattr(fs, "_iterdir"):
        from fsspec.asyn import sync

        bucket, _, key = root.partition("/")
        pages = fs._iterdir(bucket, delimiter="", prefix=key.rstrip("/") + "/" if key.strip("/") else "")
        while page := sync(fs.loop, _take, pages, LIST_BATCH):
            yield from page
        return
    todo = [root.rstrip("/")]
    while todo:
        folder = todo.pop()
        for info in fs.ls(folder, detail=True):
            name = info["name"].rstrip("/")
            if info.get("type") == "directory":
                if name != folder:
                    todo.append(name)
            else:
                yield info


async def _take(entries: AsyncIterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The next ``n`` entries (fewer at the end) of an async listing, which goes on where this stops."""
    out: list[dict[str, Any]] = []
    async for entry in entries:
        out.append(entry)
        if len(out) >= n:
            break
    return out


def list_prefix(source: str, storage_options: dict[str, Any] | None, listing: Listing) -> Iterator[pa.RecordBatch]:
    """Recursively list the image files under a local directory or an object-store prefix, in batches."""
    fs = filesystem(source, storage_options)
    root = strip(source)
    found = _Found(skipped=listing.skipped)
    try:
        if not fs.exists(root):
            raise UserError(f"source {redact(source)!r} does not exist or is not readable")
        if fs.isfile(root):
            raise UserError(
                f"source {redact(source)!r} is a single file: give a folder/prefix or a .csv/.parquet manifest"
            )
        yield from batched(
            _walk_local(root, found) if is_local(source) else _walk_store(source, storage_options, found)
        )
    except OSError as err:
        if is_transient(err):
            raise  # transient: retryable by the caller, not bad input
        raise UserError(f"cannot list source {redact(source)!r}: {err}") from None
    listing.skipped_non_image = found.non_image
    listing.notes.extend(found.notes())


# --------------------------------------------------------------------------------------------- either
def list_source(source: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """A prefix's or a manifest's images as a stream (nothing is read until ``batches`` is iterated)."""
    listing = Listing()
    if is_manifest(source):
        listing.batches = read_manifest(source, storage_options, listing.credentials, listing.notes)
    else:
        listing.batches = list_prefix(source, storage_options, listing)
    return listing


def inside_root(
    batches: Iterable[pa.RecordBatch], source: str, root: str, *, show: int = 10
) -> Iterator[pa.RecordBatch]:
    """``batches`` checked as they pass: when any listed uri escapes ``root`` (absolute paths elsewhere, ``..``,
    symlinks that resolve outside, other schemes), the whole run is refused once the stream has been counted
    (the batches after the first offender are not passed on). A manifest pointing outside is a configuration or
    security error, so nothing is tagged, rather than tagging the rest and hiding the problem in error rows.
    """
    bad: list[str] = []
    count = 0
    for batch in batches:
        outside = [u for u in batch.column("uri").to_pylist() if not within_root(u, root)]
        count += len(outside)
        bad.extend(outside[: max(0, show - len(bad))])
        if not count:
            yield batch
    if not count:
        return
    shown = ", ".join(repr(redact(u)) for u in bad) + (f" and {count - show} more" if count > show else "")
    raise UserError(
        f"{redact(source)}: {count} image uri(s) outside the allowed root {root!r} (absolute paths elsewhere, "
        f"'..', symlinks leading out, or another scheme): {shown}. Nothing was tagged: fix the manifest or the root"
    )
