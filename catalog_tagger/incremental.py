"""The nightly diff: which listed images are new or changed since the last committed run of this model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from catalog_tagger import ledger
from catalog_tagger.ledger import Layout
from catalog_tagger.storage import filesystem, strip

log = logging.getLogger(__name__)

WORK_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),
        pa.field("mtime", pa.timestamp("us", tz="UTC")),
        pa.field("prev_hash", pa.string()),  # content hash of the last committed row, when identity needs bytes
    ]
)
_PREV_COLS = ["uri", "size", "etag", "mtime", "content_hash", "status", "error", "tagged_at"]


@dataclass
class Work:
    table: pa.Table  # WORK_SCHEMA: what this run must read
    unchanged: int = 0  # listed images skipped because a committed row with the same identity exists
    resumed_uris: list[str] = field(default_factory=list)  # already staged by an earlier attempt of this run


def previous_rows(layout: Layout, model_version: str) -> pa.Table | None:
    """The latest committed row per uri for this model version (ok rows, and errors that retrying cannot fix)."""
    files = ledger.committed_files(layout, model_version=model_version)
    if not files:
        return None
    fs = filesystem(layout.output, layout.storage_options)
    ds = pads.dataset([strip(f) for f in files], format="parquet", filesystem=fs)
    table = ds.to_table(columns=_PREV_COLS)
    # Read errors (I/O, 404) are retried next run; decode errors of unchanged bytes are not.
    keep = pc.or_(pc.equal(table["status"], "ok"), pc.starts_with(pc.fill_null(table["error"], ""), "decode:"))
    table = table.filter(keep)
    if table.num_rows == 0:
        return None
    import duckdb

    con = duckdb.connect()
    con.register("prev", table)
    latest = con.sql(
        "SELECT uri, size, etag, mtime, content_hash FROM prev "
        "QUALIFY row_number() OVER (PARTITION BY uri ORDER BY tagged_at DESC) = 1"
    ).to_arrow_table()
    con.close()
    return latest


def plan_work(
    layout: Layout,
    listing: pa.Table,
    *,
    model_version: str,
    full: bool,
    resumed_shards: list[ledger.Shard],
) -> tuple[Work, list[str]]:
    """Listing minus what is already committed (unless ``full``) minus what this run already staged."""
    notes: list[str] = []
    resumed: list[str] = []
    if resumed_shards:
        fs = filesystem(layout.output, layout.storage_options)
        ds = pads.dataset([strip(s.path) for s in resumed_shards], format="parquet", filesystem=fs)
        resumed = ds.to_table(columns=["uri"]).column("uri").to_pylist()
        notes.append(f"resumed: {len(resumed)} image(s) already staged by an earlier attempt")
    table = listing
    if resumed:
        table = table.filter(pc.invert(pc.is_in(table["uri"], value_set=pa.array(resumed, pa.string()))))
    unchanged = 0
    prev = None if full else previous_rows(layout, model_version)
    if prev is None:
        work = table.append_column("prev_hash", pa.nulls(table.num_rows, pa.string()))
        return Work(table=work.cast(WORK_SCHEMA), unchanged=0, resumed_uris=resumed), notes
    import duckdb

    con = duckdb.connect()
    con.register("cur", table)
    con.register("prev", prev)
    # Identity: etag when both sides have one; else size + mtime; else the bytes' hash (checked after reading).
    rows = con.sql(
        """
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
               END AS same
        FROM cur c LEFT JOIN prev p USING (uri)
        ORDER BY c.uri
        """
    ).to_arrow_table()
    con.close()
    same = rows["same"]
    unchanged = int(pc.sum(same).as_py() or 0)
    work = rows.filter(pc.invert(same)).drop_columns(["same"])
    if unchanged:
        notes.append(f"incremental: {unchanged} image(s) unchanged since the last committed run of this model")
    return Work(table=work.cast(WORK_SCHEMA), unchanged=unchanged, resumed_uris=resumed), notes
