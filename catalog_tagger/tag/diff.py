"""The nightly diff, out of core: the listing made unique and sorted, minus the images whose committed row (this
model version, same identity) settles them, minus what this run already wrote (resume), written as work files.

A ``Diff`` is one connection to the process's DuckDB database (``duckdb_session``: in memory, under a memory limit,
spilling to a private temporary folder beyond it; its tables are temporary, so they are the connection's own and
go when it closes): the listing's batches are appended as they stream in (with their position, so that the first of
repeated uris wins), made unique and sorted there, joined with ``latest``'s identity columns and anti-joined with
the uris of this run's written files; the result goes to Parquet work files under the run's staging folder, which
the executors read in batches (Ray with ``read_parquet``). The driver never holds the listing nor the work list.
Identity of an image between runs: its ETag when both sides have one; else size + mtime; else the bytes' hash
(checked after reading, in the decode stage, against ``prev_hash``).
"""

from __future__ import annotations

import atexit
import io
import logging
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.schema import IDENTITY_COLUMNS, LISTING_SCHEMA, WORK_SCHEMA
from catalog_tagger.storage import filesystem, join, retry_transient, strip, write_bytes_atomic

if TYPE_CHECKING:
    import duckdb
    import pyarrow.dataset as pads

log = logging.getLogger(__name__)

WORK_DIR = "work"
WORK_FILE_MAX_ROWS = 50_000  # rows per work file at most (one Ray read task each)
WORK_FILES_MIN = 8  # a run is still cut into this many files (when it has the rows), for parallel reads...
WORK_FILE_MIN_ROWS = 1024  # ...of this many rows at least: a nightly run's few new images stay one model batch
MEMORY_LIMIT = "256MB"  # DuckDB's share of the driver while planning; it spills to disk beyond it
# a scan of the committed state reads a few batches ahead (not pyarrow's default 16 batches x 4 files), and a
# row group's column chunks as it decodes them (pre_buffer would hold a whole row group: ~100 MB at 10^6 rows)
_READAHEAD = {"batch_size": 65_536, "batch_readahead": 2, "fragment_readahead": 1}

_RAW = "CREATE TEMP TABLE raw (pos BIGINT, uri VARCHAR NOT NULL, size BIGINT, etag VARCHAR, mtime TIMESTAMPTZ)"
# one row per uri: the first listed (a manifest may repeat a uri with other columns)
_UNIQUE = """
    CREATE TEMP TABLE uniq AS
    SELECT uri, f.size AS size, f.etag AS etag, f.mtime AS mtime
    FROM (SELECT uri, arg_min({'size': size, 'etag': etag, 'mtime': mtime}, pos) AS f FROM raw GROUP BY uri)
"""
_DIFF = """
    CREATE TEMP TABLE diffed AS
    SELECT c.uri, c.size, c.etag, c.mtime,
           CASE WHEN p.uri IS NOT NULL AND NOT (c.etag IS NOT NULL AND p.etag IS NOT NULL)
                     AND NOT (c.size IS NOT NULL AND c.mtime IS NOT NULL AND p.size IS NOT NULL
                              AND p.mtime IS NOT NULL)
                THEN p.content_hash END AS prev_hash,
           p.uri IS NOT NULL AS known,
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
_COUNTS = """
    SELECT count(*) FILTER (WHERE NOT resumed AND NOT known),
           count(*) FILTER (WHERE NOT resumed AND known AND NOT same),
           count(*) FILTER (WHERE NOT resumed AND same),
           count(*) FILTER (WHERE resumed)
    FROM diffed
"""


_DB: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (the process that opened it, the database)
_DB_LOCK = threading.Lock()


def duckdb_session(memory_limit: str) -> duckdb.DuckDBPyConnection:
    """A new connection to this process's one in-memory DuckDB database, whose memory limit becomes ``memory_limit``
    (it spills to a private temporary folder beyond it). Opening a DuckDB database costs ~13 ms, a connection to an
    open one microseconds: planning and the commit's dedup each took one per run. Keep what a connection creates
    ``TEMP`` (its own, dropped when it closes); the limit is the database's, set by the latest session."""
    import duckdb

    global _DB
    with _DB_LOCK:
        if _DB is None or _DB[0] != os.getpid():  # a forked child never shares its parent's database
            folder = tempfile.mkdtemp(prefix="catalog-tagger-duckdb-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            config: dict[str, str | bool | int | float | list[str]] = {
                "memory_limit": memory_limit,
                "temp_directory": folder,
                "threads": max(1, min(4, os.cpu_count() or 1)),
            }
            _DB = (os.getpid(), duckdb.connect(":memory:", config=config))
        con = _DB[1].cursor()
    con.execute(f"SET memory_limit='{memory_limit}'")
    return con


@dataclass(frozen=True)
class Counts:
    """The listing against the committed state: each listed image in exactly one of these."""

    new: int  # no committed row of this model version
    changed: int  # a committed row, of another identity (or one only the bytes' hash can tell)
    unchanged: int  # a committed row of this model version settles it
    resumed: int  # this run already wrote it (an earlier attempt)


@dataclass(frozen=True)
class Work:
    """The listing after the diff, as files."""

    files: list[str]  # work files (WORK_SCHEMA), URIs in the output store
    rows: int  # images to tag: new + changed
    unchanged: int  # listed images a committed row of this model version settles
    resumed: int  # listed images this run already wrote (an earlier attempt)


def work_dir(staging: str) -> str:
    return join(staging, WORK_DIR)


class Diff:
    """One planning pass (a context manager): ``add`` the listing's batches, ``settle`` them, ``join`` with the
    committed state, then ``write`` the work files (or not: ``tag --plan-only``)."""

    def __init__(self) -> None:
        self.con = duckdb_session(MEMORY_LIMIT)
        self.con.execute(_RAW)
        self._pos = 0
        self.counts: Counts | None = None

    def __enter__(self) -> Diff:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.con.close()  # its temporary tables (and what they spilled) go with it

    def add(self, batch: pa.RecordBatch) -> None:
        """Append one listing batch (LISTING_SCHEMA), numbering its rows after the ones before."""
        pos = pa.array(range(self._pos, self._pos + batch.num_rows), pa.int64())
        self._pos += batch.num_rows
        self.con.register("batch", pa.Table.from_batches([batch]).add_column(0, "pos", pos))
        self.con.execute("INSERT INTO raw SELECT pos, uri, size, etag, mtime FROM batch")
        self.con.unregister("batch")

    def settle(self, limit: int | None) -> tuple[int, int, int]:
        """Make the uris unique (the first listed wins) and keep the first ``limit`` in uri order; returns (rows
        added, unique uris, uris kept)."""
        self.con.execute(_UNIQUE)
        self.con.execute("DROP TABLE raw")
        unique = self._count("uniq")
        if limit is not None and unique > limit:
            self.con.execute(f"CREATE TEMP TABLE listing AS SELECT * FROM uniq ORDER BY uri LIMIT {int(limit)}")
            self.con.execute("DROP TABLE uniq")
        else:
            self.con.execute("ALTER TABLE uniq RENAME TO listing")
        return self._pos, unique, self._count("listing")

    def _count(self, table: str) -> int:
        return int(self.con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])

    def join(self, state: pads.Dataset | None, done: pads.Dataset | None, *, model_version: str) -> Counts:
        """Diff the settled listing against the committed ``state`` of ``model_version`` (None: tag everything)
        and ``done`` (this run's written files)."""
        self.con.register("prev", _state_reader(state, model_version))
        self.con.register("done", _done_reader(done))
        self.con.execute(_DIFF)
        self.counts = Counts(*(int(n) for n in self.con.execute(_COUNTS).fetchall()[0]))
        return self.counts

    def write(self, staging: str, storage_options: dict[str, Any] | None) -> Work:
        """The work files (new and changed images, in uri order) under ``staging``, replacing an earlier
        attempt's."""
        assert self.counts is not None, "join first"
        c = self.counts
        reader = self.con.sql(
            "SELECT uri, size, etag, mtime, prev_hash FROM diffed WHERE NOT same AND NOT resumed ORDER BY uri"
        ).to_arrow_reader(8192)
        rows = c.new + c.changed
        files = _write_files(reader, rows, staging, storage_options)
        return Work(files=files, rows=rows, unchanged=c.unchanged, resumed=c.resumed)


def _state_reader(state: pads.Dataset | None, model_version: str) -> pa.RecordBatchReader:
    schema = pa.schema([*LISTING_SCHEMA, ("content_hash", pa.string())])
    if state is None:
        return pa.RecordBatchReader.from_batches(schema, iter(()))
    # cast: delta-rs MERGE writes string columns as string_view, which pyarrow cannot compare with a string
    flt = pc.field("model_version").cast(pa.string()) == model_version
    import pyarrow.dataset as pads

    options = pads.ParquetFragmentScanOptions(pre_buffer=False)
    scanner = state.scanner(columns=IDENTITY_COLUMNS, filter=flt, fragment_scan_options=options, **_READAHEAD)
    return pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in scanner.to_batches()))


def _done_reader(done: pads.Dataset | None) -> pa.RecordBatchReader:
    schema = pa.schema([("uri", pa.string())])
    if done is None:
        return pa.RecordBatchReader.from_batches(schema, iter(()))
    return pa.RecordBatchReader.from_batches(schema, done.scanner(columns=["uri"], **_READAHEAD).to_batches())


def _write_files(batches: pa.RecordBatchReader, rows: int, staging: str, opts: dict[str, Any] | None) -> list[str]:
    """Stream the work rows into files of at most ``WORK_FILE_MAX_ROWS`` rows (and at least ``WORK_FILES_MIN``
    files when each still holds ``WORK_FILE_MIN_ROWS``), replacing an earlier attempt's work files. The local
    executor predicts file by file: ten new images in five files would be five forward passes instead of one."""
    import pyarrow.parquet as pq

    folder = work_dir(staging)
    fs = filesystem(folder, opts)
    if retry_transient(lambda: fs.exists(strip(folder)), f"stat {folder}"):
        retry_transient(lambda: fs.rm(strip(folder), recursive=True), f"remove {folder}")
    per_file = min(WORK_FILE_MAX_ROWS, max(WORK_FILE_MIN_ROWS, math.ceil(rows / WORK_FILES_MIN)))
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
