"""The nightly diff: which listed images are new or changed since the last committed run of this model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from catalog_tagger.storage import filesystem, strip
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag.commit import Layout

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


def _final_rows(layout: Layout, files: list[str]) -> pa.Table | None:
    """Committed rows that settle an image: ok rows, and errors that retrying cannot fix."""
    if not files:
        return None
    fs = filesystem(layout.output, layout.storage_options)
    ds = pads.dataset([strip(f) for f in files], format="parquet", filesystem=fs)
    table = ds.to_table(columns=_PREV_COLS)
    # Read errors (I/O, 404) are retried next run; decode errors of unchanged bytes are not.
    keep = pc.or_(pc.equal(table["status"], "ok"), pc.starts_with(pc.fill_null(table["error"], ""), "decode:"))
    table = table.filter(keep)
    return table if table.num_rows else None


def previous_rows(layout: Layout, model_version: str) -> pa.Table | None:
    """The latest committed row per uri for this model version (ok rows, and errors that retrying cannot fix)."""
    table = _final_rows(layout, ledger.committed_files(layout, model_version=model_version))
    if table is None:
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


# ------------------------------------------------------------------------------------------ concurrent runs
def committed_meanwhile(
    layout: Layout,
    *,
    model_version: str,
    run_id: str,
    known_runs: list[str] | None,
    started_at: str,
) -> tuple[pa.Table | None, list[str]]:
    """Rows settled by runs of this model version that committed after this run planned its work.

    ``known_runs`` are the runs already committed when this run first planned (its diff excluded their images);
    any other committed run may have tagged the same images concurrently. Without ``known_runs`` (a run staged by
    an older version), runs that finished at or after ``started_at`` count. Call under the commit lock.
    """
    known = set(known_runs) if known_runs is not None else None
    newer = [
        m
        for m in ledger.committed_manifests(layout)
        if m.get("model_version") == model_version
        and m.get("run_id") != run_id
        and (m.get("run_id") not in known if known is not None else m.get("finished_at", "") >= started_at)
    ]
    files = [layout.abs(f["path"]) for m in newer for f in m.get("files", [])]
    return _final_rows(layout, files), [m["run_id"] for m in newer]


def already_committed(staged: pa.Table, other: pa.Table) -> pa.Array:
    """Boolean mask over ``staged``: rows whose uri was settled by ``other`` with the same identity (etag; else
    size + mtime; else the bytes' hash), so committing them again would duplicate the image.
    """
    import duckdb

    con = duckdb.connect()
    con.register("staged", staged.select(["uri", "size", "etag", "mtime", "content_hash"]))
    con.register("other", other.select(["uri", "size", "etag", "mtime", "content_hash"]))
    dup = con.sql(
        """
        SELECT DISTINCT s.uri FROM staged s JOIN other o USING (uri)
        WHERE CASE
          WHEN s.etag IS NOT NULL AND o.etag IS NOT NULL THEN s.etag = o.etag
          WHEN s.size IS NOT NULL AND s.mtime IS NOT NULL AND o.size IS NOT NULL AND o.mtime IS NOT NULL
            THEN s.size = o.size AND s.mtime = o.mtime
          WHEN s.content_hash IS NOT NULL AND o.content_hash IS NOT NULL THEN s.content_hash = o.content_hash
          ELSE FALSE
        END
        """
    ).to_arrow_table()
    con.close()
    return pc.is_in(staged["uri"], value_set=dup["uri"].combine_chunks())
