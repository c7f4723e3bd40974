"""The write stage: each write task turns a batch of predicted rows into one Parquet data file of the history
table, plus a sidecar that says the file is whole. Runs in Ray write tasks (many at once, on any node) or in this
process; the driver never sees the rows, only one small stats row per file.

A data file goes straight into its partition folder of ``OUT/predictions`` under a name derived from the run id
and the rows' uris, so a retried task rewrites the same file instead of adding a second copy. It is invisible to
every reader until the run's Delta commit names it (``commit.py``). Its sidecar (``_staging/<run_id>/files/``),
written after the file, carries what the commit needs (size, rows, counts, seconds); a file without a sidecar was
cut short and is ignored, and a rerun of the run id resumes from the files that have one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import socket
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.schema import ACCEL_COL, DECODE_COL, STATUS_ERROR, STATUS_OK, STATUS_UNCHANGED
from catalog_tagger.storage import filesystem, join, retry_transient, strip, write_bytes_atomic
from catalog_tagger.tag import delta

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
FILES_DIR = "files"
ROW_GROUP_ROWS = 8192
# Internal per-row seconds -> the stats key they are summed into (then dropped from the file).
TIMING_COLS = {"accel_s": ACCEL_COL, "decode_s": DECODE_COL}
STATS_SCHEMA = pa.schema(  # what a write task returns to the driver: one row per data file
    [
        ("path", pa.string()),
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("error", pa.int64()),
        ("unchanged", pa.int64()),
        ("bytes", pa.int64()),
    ]
)


@dataclass(frozen=True)
class StagedFile:
    """A data file written for a run and not yet committed, as its sidecar describes it."""

    path: str  # relative to the predictions table (``run_date=.../part-....parquet``): the Delta add path
    run_date: str
    rows: int
    ok: int
    error: int
    bytes: int
    modified_ms: int
    accel_s: float = 0.0
    decode_s: float = 0.0
    node: str = ""  # the Ray node (else the host) that wrote it


def _node() -> str:
    """Where this write task runs: its Ray node id, or the host name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return socket.gethostname()


def staging(output: str, run_id: str) -> str:
    return join(output, STAGING_DIR, run_id)


def sidecar_uri(output: str, run_id: str, name: str) -> str:
    return join(staging(output, run_id), FILES_DIR, name + ".json")


def data_uri(output: str, rel_path: str) -> str:
    return join(output, delta.PREDICTIONS, *rel_path.split("/"))


@dataclass(frozen=True)
class PartWriter:
    """Writes one data file per call (picklable: Ray ships it to its write tasks)."""

    output: str
    run_id: str
    run_date: str
    storage_options: dict[str, Any] | None
    file_schema: pa.Schema  # delta.file_schema(...): the history's columns without the partition

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Write ``batch``'s ok and error rows (rows of unchanged images are only counted) as one file."""
        batch = _dedup(batch)
        unchanged_mask = pc.equal(batch.column("status"), STATUS_UNCHANGED)
        unchanged = int(pc.sum(unchanged_mask).as_py() or 0)
        rows = batch.filter(pc.invert(unchanged_mask))
        if not rows.num_rows:
            return pa.table({"path": [None], "rows": [0], "ok": [0], "error": [0], "unchanged": [unchanged],
                             "bytes": [0]}, schema=STATS_SCHEMA)  # fmt: skip
        staged = self.write(rows)
        return pa.table(
            {
                "path": [staged.path],
                "rows": [staged.rows],
                "ok": [staged.ok],
                "error": [staged.error],
                "unchanged": [unchanged],
                "bytes": [staged.bytes],
            },
            schema=STATS_SCHEMA,
        )

    def write(self, rows: pa.Table, timing: dict[str, float] | None = None) -> StagedFile:
        """The data file, then its sidecar (the file is whole once the sidecar exists). ``timing``: the seconds to
        record when ``rows`` no longer carry the per-row timing columns (a file rewritten without some rows)."""
        import pyarrow.parquet as pq

        if timing is None:
            timing = {key: float(pc.sum(rows.column(col)).as_py() or 0.0) for key, col in TIMING_COLS.items()}
        rows = rows.drop_columns([c for c in TIMING_COLS.values() if c in rows.column_names])
        rows = conform(rows, self.file_schema)
        name = file_name(self.run_id, rows.column("uri"))
        rel = f"{delta.PARTITION}={self.run_date}/{name}.parquet"
        buf = io.BytesIO()
        pq.write_table(rows, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        write_bytes_atomic(data_uri(self.output, rel), buf.getvalue(), self.storage_options)
        counts = status_counts(rows)
        staged = StagedFile(
            path=rel,
            run_date=self.run_date,
            rows=rows.num_rows,
            ok=counts[STATUS_OK],
            error=counts[STATUS_ERROR],
            bytes=buf.tell(),
            modified_ms=int(time.time() * 1000),
            node=_node(),
            **timing,
        )
        body = json.dumps(asdict(staged), sort_keys=True).encode()
        write_bytes_atomic(sidecar_uri(self.output, self.run_id, name), body, self.storage_options)
        return staged


def conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """``rows`` in ``schema``'s column order and types; a column the model does not produce (a table that also
    holds another model's tasks, ``--allow-task-change``) is NULL."""
    columns = [
        rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def file_name(run_id: str, uris: pa.ChunkedArray) -> str:
    """``part-<run_id>-<hash of the uris>``: the same rows always land in the same file (retries overwrite),
    however the column is chunked or sliced (the hash covers the values, not the buffers behind them)."""
    digest = hashlib.blake2b(digest_size=12)
    values = uris.cast(pa.string()).combine_chunks()
    if len(values):
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset : values.offset + len(values) + 1]
        data = values.buffers()[2]
        digest.update(np.diff(offsets).astype(np.int64).tobytes())  # the lengths
        digest.update(b"" if data is None else memoryview(data)[offsets[0] : offsets[-1]])  # the characters
    return f"part-{run_id}-{digest.hexdigest()}"


def status_counts(table: pa.Table) -> dict[str, int]:
    """``ok`` and ``error`` rows of a table in the output schema."""
    status = table.column("status")
    return {
        STATUS_OK: int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0),
        STATUS_ERROR: int(pc.sum(pc.equal(status, STATUS_ERROR)).as_py() or 0),
    }


def _dedup(batch: pa.Table) -> pa.Table:
    """Repeats of a uri within one batch (a retried upstream batch delivered twice into one bundle) appear once."""
    uris = batch.column("uri")
    if pc.count_distinct(uris).as_py() == batch.num_rows:
        return batch
    first = (
        pa.table({"uri": uris, "i": pa.array(range(batch.num_rows), pa.int64())})
        .group_by("uri")
        .aggregate([("i", "min")])
    )
    return batch.take(pc.take(first["i_min"], pc.sort_indices(first["i_min"])))


def staged_files(output: str, run_id: str, storage_options: dict[str, Any] | None) -> list[StagedFile]:
    """Every whole data file of an uncommitted run (those with a sidecar), by path."""
    fs = filesystem(output, storage_options)
    folder = strip(join(staging(output, run_id), FILES_DIR))
    fs.invalidate_cache(folder)
    try:
        entries = retry_transient(lambda: fs.ls(folder, detail=True), f"list {folder}")
    except FileNotFoundError:
        return []
    names = sorted(e["name"] for e in entries if e.get("type") == "file" and e["name"].endswith(".json"))
    out = []
    for name in names:
        body = retry_transient(partial(fs.cat_file, name), f"read {name}")
        try:
            out.append(StagedFile(**json.loads(body)))
        except (ValueError, TypeError) as err:  # not ours, or damaged: its file is written again
            log.warning("ignoring the unreadable sidecar %s: %s", name, err)
    return out


def remove_staged(output: str, run_id: str, staged: StagedFile, storage_options: dict[str, Any] | None) -> None:
    """Unstage a file: its sidecar first (a crash in between leaves an ignored file, never a bad one)."""
    fs = filesystem(output, storage_options)
    name = posixpath.basename(staged.path)[: -len(".parquet")]
    for uri in (sidecar_uri(output, run_id, name), data_uri(output, staged.path)):
        try:
            retry_transient(partial(fs.rm, strip(uri)), f"remove {uri}")
        except FileNotFoundError:
            continue
