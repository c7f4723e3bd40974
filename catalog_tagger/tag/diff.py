"""The nightly diff, out of core: the listing minus the images whose committed row (this model version, same
identity) settles them, minus what this run already wrote (resume), written as the run's work files.

DuckDB joins the listing with ``latest``'s identity columns and anti-joins the uris of this run's written files,
under a memory limit (it spills to disk beyond it); the result goes to Parquet work files under the run's staging
folder, which the executors read in batches (Ray with ``read_parquet``), so the driver never holds the work list.
Identity of an image between runs: its ETag when both sides have one; else size + mtime; else the bytes' hash
(checked after reading, in the decode stage, against ``prev_hash``).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.schema import LISTING_SCHEMA, WORK_SCHEMA
from catalog_tagger.storage import filesystem, join, retry_transient, strip, write_bytes_atomic
from catalog_tagger.tag.dedup import connect

if TYPE_CHECKING:
    import pyarrow.dataset as pads

log = logging.getLogger(__name__)

WORK_DIR = "work"
WORK_FILE_MAX_ROWS = 50_000  # rows per work file at most (one Ray read task each)
WORK_FILES_MIN = 8  # a small run is still cut into this many files (when it has the rows), for parallel reads
STATE_COLUMNS = ["uri", "size", "etag", "mtime", "content_hash"]

_DIFF = """
    CREATE TEMP TABLE diffed AS
    SELECT c.uri, c.size, c.etag, c.mtime,
           CASE WHEN p.uri IS NOT NULL AND NOT (c.etag IS NOT NULL AND p.etag IS NOT NULL)
                     AND NOT (c.size IS NOT NULL AND c.mtime IS NOT NULL AND p.size IS NOT NULL
                              AND p.mtime IS NOT NULL)
                THEN p.content_hash END AS prev_hash,
           CASE
             WHEN p.uri IS NULL THEN FALSE
             WHEN c.etag IS NOT NULL AND p.etag IS NOT NULL THEN c.etag = p.etag
             WHEN c.size IS NOT NULL AND c.mtime IS NOT NULL AND p.size IS NOT NULL AND p.mtime IS NOT NULL
               THEN c.size = p.size AND c.mtime = p.mtime
             ELSE FALSE
           END AS same,
           d.uri IS NOT NULL AS resumed
    FROM listing c
    LEFT JOIN prev p USING (uri)
    LEFT JOIN (SELECT DISTINCT uri FROM done) d USING (uri)
"""


@dataclass(frozen=True)
class Work:
    """The listing after the diff, as files."""

    files: list[str]  # work files (WORK_SCHEMA), URIs in the output store
    rows: int  # images to tag
    unchanged: int  # listed images a committed row of this model version settles
    resumed: int  # listed images this run already wrote (an earlier attempt)


def work_dir(staging: str) -> str:
    return join(staging, WORK_DIR)


def build_work(
    listing: Iterable[pa.RecordBatch],
    state: pads.Dataset | None,
    done: pads.Dataset | None,
    *,
    model_version: str,
    staging: str,
    storage_options: dict[str, Any] | None,
) -> Work:
    """Diff ``listing`` (LISTING_SCHEMA batches) against the committed ``state`` of ``model_version`` (None: tag
    everything) and ``done`` (this run's written files), writing the work files under ``staging``."""
    con = connect()
    try:
        con.register("listing", pa.RecordBatchReader.from_batches(LISTING_SCHEMA, listing))
        con.register("prev", _state_reader(state, model_version))
        con.register("done", _done_reader(done))
        con.execute(_DIFF)
        counts = con.execute(
            "SELECT count(*) FILTER (WHERE resumed), count(*) FILTER (WHERE same AND NOT resumed), "
            "count(*) FILTER (WHERE NOT same AND NOT resumed) FROM diffed"
        ).fetchall()
        resumed, unchanged, rows = (int(n) for n in counts[0])
        reader = con.sql(
            "SELECT uri, size, etag, mtime, prev_hash FROM diffed WHERE NOT same AND NOT resumed ORDER BY uri"
        ).to_arrow_reader(8192)
        files = _write_files(reader, rows, staging, storage_options)
    finally:
        con.close()
    return Work(files=files, rows=rows, unchanged=unchanged, resumed=resumed)


def _state_reader(state: pads.Dataset | None, model_version: str) -> pa.RecordBatchReader:
    schema = pa.schema([*LISTING_SCHEMA, ("content_hash", pa.string())])
    if state is None:
        return pa.RecordBatchReader.from_batches(schema, iter(()))
    # cast: delta-rs MERGE writes string columns as string_view, which pyarrow cannot compare with a string
    flt = pc.field("model_version").cast(pa.string()) == model_version
    scanner = state.scanner(columns=STATE_COLUMNS, filter=flt)
    return pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in scanner.to_batches()))


def _done_reader(done: pads.Dataset | None) -> pa.RecordBatchReader:
    schema = pa.schema([("uri", pa.string())])
    if done is None:
        return pa.RecordBatchReader.from_batches(schema, iter(()))
    return pa.RecordBatchReader.from_batches(schema, done.scanner(columns=["uri"]).to_batches())


def _write_files(batches: pa.RecordBatchReader, rows: int, staging: str, opts: dict[str, Any] | None) -> list[str]:
    """Stream the work rows into files of at most ``WORK_FILE_MAX_ROWS`` rows (and at least ``WORK_FILES_MIN``
    files when there are that many rows), replacing an earlier attempt's work files."""
    import pyarrow.parquet as pq

    folder = work_dir(staging)
    fs = filesystem(folder, opts)
    if retry_transient(lambda: fs.exists(strip(folder)), f"stat {folder}"):
        retry_transient(lambda: fs.rm(strip(folder), recursive=True), f"remove {folder}")
    per_file = max(1, min(WORK_FILE_MAX_ROWS, math.ceil(rows / WORK_FILES_MIN)))
    files: list[str] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def flush(upto: int) -> None:
        nonlocal pending, pending_rows
        table = pa.Table.from_batches(pending, schema=WORK_SCHEMA)
        head, rest = table.slice(0, upto), table.slice(upto)
        buf = io.BytesIO()
        pq.write_table(head, buf, compression="zstd")
        uri = join(folder, f"work-{len(files):06d}.parquet")
        write_bytes_atomic(uri, buf.getvalue(), opts)
        files.append(uri)
        pending, pending_rows = rest.to_batches(), rest.num_rows

    for batch in batches:
        pending.append(batch.cast(WORK_SCHEMA))
        pending_rows += batch.num_rows
        while pending_rows >= per_file:
            flush(per_file)
    if pending_rows:
        flush(pending_rows)
    return files
