"""Each image committed once per run and across runs: the check a run makes, under the commit lock, just before
its Delta commit.

Two ways a row would be committed twice: another run of the same model committed the same image (same identity)
after this run planned its work (two runs started together, or a crashed run taken over and resumed); or one of
this run's images sits in two of its data files (Ray Data is at-least-once: a retried task can deliver rows that
another task already wrote). Both are found in one out-of-core DuckDB pass over the run's data files (uri and
identity only) and the other runs' committed rows; the affected files are rewritten without those rows (new file
and sidecar first, then the old one removed), which a rerun repeats idempotently.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.schema import IDENTITY_COLUMNS
from catalog_tagger.storage import filesystem, retry_transient, strip
from catalog_tagger.tag import delta, writer
from catalog_tagger.tag.diff import duckdb_session
from catalog_tagger.tag.latest import settles
from catalog_tagger.tag.writer import PartWriter, StagedFile

if TYPE_CHECKING:
    import duckdb
    from deltalake import DeltaTable

log = logging.getLogger(__name__)

DUCKDB_MEMORY = "1GB"  # the join spills to disk beyond this
# The same image: the same ETag when both have one; else the same size + mtime; else the same bytes' hash.
SAME_IMAGE = """
    CASE
      WHEN s.etag IS NOT NULL AND o.etag IS NOT NULL THEN s.etag = o.etag
      WHEN s.size IS NOT NULL AND s.mtime IS NOT NULL AND o.size IS NOT NULL AND o.mtime IS NOT NULL
        THEN s.size = o.size AND s.mtime = o.mtime
      WHEN s.content_hash IS NOT NULL AND o.content_hash IS NOT NULL THEN s.content_hash = o.content_hash
      ELSE FALSE
    END
"""


@dataclass
class Dropped:
    """What the check removed before the commit."""

    files: list[StagedFile]  # what to commit
    meanwhile: int = 0  # rows another run committed first
    repeats: int = 0  # rows that were in two files of this run
    runs: list[str] = field(default_factory=list)  # runs committed since this run planned (same model)


def _staged_batches(sink: PartWriter, files: list[StagedFile]) -> Iterator[pa.RecordBatch]:
    """Identity columns of every staged file, with the file's index and each row's position in it."""
    import pyarrow.parquet as pq

    fs = filesystem(sink.output, sink.storage_options)
    for index, staged in enumerate(files):
        path = strip(writer.data_uri(sink.output, staged.path))
        read = partial(pq.read_table, path, columns=IDENTITY_COLUMNS, filesystem=fs)
        table = retry_transient(read, f"read {path}")
        table = table.append_column("f", pa.array([index] * table.num_rows, pa.int32()))
        table = table.append_column("i", pa.array(range(table.num_rows), pa.int64()))
        yield from table.to_batches()


def _schema() -> pa.Schema:
    return pa.schema(
        [
            ("uri", pa.string()),
            ("size", pa.int64()),
            ("etag", pa.string()),
            ("mtime", pa.timestamp("us", tz="UTC")),
            ("content_hash", pa.string()),
            ("f", pa.int32()),
            ("i", pa.int64()),
        ]
    )


def _duplicate_rows(
    con: duckdb.DuckDBPyConnection, sink: PartWriter, files: list[StagedFile], other: pa.RecordBatchReader | None
) -> tuple[dict[int, set[int]], int, int]:
    """(file index -> row positions to drop, rows committed meanwhile, repeated rows)."""
    schema = _schema()
    batches = (b.cast(schema) for b in _staged_batches(sink, files))
    con.register("staged_in", pa.RecordBatchReader.from_batches(schema, batches))
    con.execute("CREATE TEMP TABLE staged AS SELECT * FROM staged_in")
    query = (
        "SELECT f, i, 'repeat' AS why FROM "
        "(SELECT f, i, row_number() OVER (PARTITION BY uri ORDER BY f, i) AS k FROM staged) WHERE k > 1"
    )
    if other is not None:
        con.register("other", other)
        query += f" UNION SELECT s.f, s.i, 'meanwhile' FROM staged s JOIN other o USING (uri) WHERE {SAME_IMAGE}"
    drop: dict[int, set[int]] = defaultdict(set)
    counts = {"repeat": 0, "meanwhile": 0}
    seen: set[tuple[int, int]] = set()
    for f, i, why in con.sql(query).fetchall():
        if (f, i) not in seen:
            seen.add((f, i))
            drop[int(f)].add(int(i))
            counts[why] += 1
    return drop, counts["meanwhile"], counts["repeat"]


def _other_rows(table: DeltaTable, run_ids: list[str]) -> pa.RecordBatchReader:
    """Identity columns of the rows that settle an image in the given committed runs, streamed."""
    ds = delta.dataset(table)
    flt = pc.field("run_id").isin(run_ids) & settles()
    return ds.scanner(columns=IDENTITY_COLUMNS, filter=flt).to_reader()


def _one_unique_file(sink: PartWriter, files: list[StagedFile]) -> bool:
    """Whether the run wrote a single file whose uris are unique (a nightly run's few new images): then no row can
    repeat, and with no run committed meanwhile the commit needs no DuckDB pass."""
    import pyarrow.parquet as pq

    if len(files) != 1:
        return False
    fs = filesystem(sink.output, sink.storage_options)
    path = strip(writer.data_uri(sink.output, files[0].path))
    uris = retry_transient(partial(pq.read_table, path, columns=["uri"], filesystem=fs), f"read {path}")["uri"]
    return bool(pc.count_distinct(uris).as_py() == len(uris))


def drop_duplicates(
    sink: PartWriter, table: DeltaTable, files: list[StagedFile], *, known_version: int, model_version: str
) -> Dropped:
    """Rewrite the run's files without rows committed meanwhile or repeated; returns what to commit."""
    runs = [
        r.run_id
        for r in delta.runs_after(table, known_version)
        if r.manifest.get("model_version") == model_version and r.run_id != sink.run_id
    ]
    if not runs and _one_unique_file(sink, files):
        return Dropped(files=files, runs=runs)  # nothing to compare with: the DuckDB pass would find nothing
    con = duckdb_session(DUCKDB_MEMORY)
    try:
        other = _other_rows(table, runs) if runs else None
        drop, meanwhile, repeats = _duplicate_rows(con, sink, files, other)
    finally:
        con.close()
    if not drop:
        return Dropped(files=files, runs=runs)
    kept = [f for index, f in enumerate(files) if index not in drop]
    for index, rows in sorted(drop.items()):
        rewritten = _rewrite(sink, files[index], rows)
        if rewritten is not None:
            kept.append(rewritten)
    log.warning(
        "run %s: %d row(s) committed meanwhile by %s and %d repeated row(s) dropped before the commit",
        sink.run_id,
        meanwhile,
        ", ".join(runs) or "no run",
        repeats,
    )
    return Dropped(files=sorted(kept, key=lambda f: f.path), meanwhile=meanwhile, repeats=repeats, runs=runs)


def _rewrite(sink: PartWriter, staged: StagedFile, drop: set[int]) -> StagedFile | None:
    """``staged`` without the rows at ``drop``: the new file and sidecar first, then the old pair removed."""
    import pyarrow.parquet as pq

    fs = filesystem(sink.output, sink.storage_options)
    path = strip(writer.data_uri(sink.output, staged.path))
    rows = retry_transient(lambda: pq.read_table(path, filesystem=fs), f"read {path}")
    keep = pc.invert(pc.is_in(pa.array(range(rows.num_rows), pa.int64()), pa.array(sorted(drop), pa.int64())))
    rows = rows.filter(keep)
    new: StagedFile | None = None
    if rows.num_rows:
        share = rows.num_rows / max(1, staged.rows)
        timing: dict[str, Any] = {k: getattr(staged, k) * share for k in tuple(writer.TIMING_COLS)}
        new = sink.write(rows, timing)
    if new is None or new.path != staged.path:
        writer.remove_staged(sink.output, sink.run_id, staged, sink.storage_options)
    return new
