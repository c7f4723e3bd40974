"""What a run must tag: the listing minus the images already committed (the nightly diff) minus resumed ones.

Identity of an image between runs: its ETag when both sides have one; else size + mtime; else the bytes' hash
(checked after reading, in the decode stage). Under the commit lock the same identity drops staged rows that a
concurrent run committed first (``drop_committed_meanwhile``), so each image is committed once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from catalog_tagger.errors import UserError
from catalog_tagger.schema import STATUS_OK, WORK_SCHEMA
from catalog_tagger.storage import redact, strip
from catalog_tagger.tag import commit
from catalog_tagger.tag.commit import Layout, Shard
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.sources import Listing, list_source, refuse_outside_root

log = logging.getLogger(__name__)

_PREV_COLS = ["uri", "size", "etag", "mtime", "content_hash", "status", "error", "tagged_at"]
_IDENTITY_COLS = ["uri", "size", "etag", "mtime", "content_hash"]
_TIMING_STATS = ("accel_s", "single_s", "decode_s")  # shard stats kept when a shard is rewritten


@dataclass
class Work:
    """The listing after the diff."""

    table: pa.Table  # WORK_SCHEMA: what this run must read
    unchanged: int = 0  # listed images skipped because a committed row with the same identity exists
    resumed_uris: list[str] = field(default_factory=list)  # already staged by an earlier attempt of this run


@dataclass
class RunPlan:
    """One attempt of a run: what was listed, what is left to tag, and what earlier attempts staged."""

    layout: Layout
    run_id: str
    listing: Listing
    work: Work
    state: dict[str, Any]  # the run's ``_run.json``: run_date, started_at, model_version, known_runs
    done: list[Shard]  # shards staged by earlier attempts (resumed)
    notes: list[str]
    list_s: float  # seconds spent listing the source

    @property
    def tagged_at(self) -> datetime:
        """Every row of the run carries its first attempt's start."""
        return datetime.fromisoformat(self.state["started_at"])

    @property
    def next_index(self) -> int:
        """Index of the next part file (after the resumed ones)."""
        return max((s.index for s in self.done), default=-1) + 1


def plan_run(cfg: TagJobConfig, layout: Layout, run_id: str, model_version: str) -> RunPlan:
    """List the source (refusing uris outside the allowed root before anything is written), record the run's
    state, and diff the listing against committed runs and this run's staged shards."""
    t0 = time.perf_counter()
    listing = list_source(cfg.source, cfg.storage_options, limit=cfg.limit)
    list_s = time.perf_counter() - t0
    if cfg.allowed_root is not None:
        refuse_outside_root(listing, cfg.source, cfg.allowed_root)
    state = run_state(layout, run_id, model_version, cfg)
    done = commit.done_shards(layout, run_id)
    work, notes = plan_work(layout, listing.table, model_version=model_version, full=cfg.full, resumed_shards=done)
    resumed = f", {len(work.resumed_uris)} already staged (resumed)" if work.resumed_uris else ""
    log.info("run %s: %d listed, %d to tag%s", run_id, listing.table.num_rows, work.table.num_rows, resumed)
    return RunPlan(layout, run_id, listing, work, state, done, listing.notes + notes, list_s)


def run_state(layout: Layout, run_id: str, model_version: str, cfg: TagJobConfig) -> dict[str, Any]:
    """This run's ``_run.json`` (created on its first attempt, read back when resuming)."""
    state_uri = layout.staged(run_id, "_run.json")
    state = commit.read_json(state_uri, cfg.storage_options)
    if state is not None and state.get("model_version") != model_version:
        raise UserError(
            f"run {run_id} was started with model {state.get('model_version')}, not {model_version}: use a new run id"
        )
    if state is None:
        now = datetime.now(UTC)
        state = {
            "run_id": run_id,
            "run_date": now.strftime("%Y-%m-%d"),
            "started_at": now.isoformat(timespec="seconds"),
            "model_version": model_version,
            "source": redact(cfg.source),
            # Runs committed before this one planned its work: any other run that commits before us may have
            # tagged the same images concurrently, and is checked under the commit lock.
            "known_runs": commit.committed_run_ids(layout),
        }
        with commit.output_errors(run_id, cfg.output):
            commit.write_json(state_uri, state, cfg.storage_options)
    return state


# --------------------------------------------------------------------------------------------- the diff
def _final_rows(layout: Layout, files: list[str]) -> pa.Table | None:
    """Committed rows that settle an image: ok rows, and errors that retrying cannot fix."""
    if not files:
        return None
    ds = pads.dataset([strip(f) for f in files], format="parquet", filesystem=layout.fs())
    table = ds.to_table(columns=_PREV_COLS)
    # Read errors (I/O, 404) are retried next run; decode errors of unchanged bytes are not.
    keep = pc.or_(pc.equal(table["status"], STATUS_OK), pc.starts_with(pc.fill_null(table["error"], ""), "decode:"))
    table = table.filter(keep)
    return table if table.num_rows else None


def previous_rows(layout: Layout, model_version: str) -> pa.Table | None:
    """The latest committed row per uri for this model version (ok rows, and errors that retrying cannot fix)."""
    table = _final_rows(layout, commit.committed_files(layout, model_version=model_version))
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


def _resumed_uris(layout: Layout, shards: list[Shard]) -> list[str]:
    if not shards:
        return []
    ds = pads.dataset([strip(s.path) for s in shards], format="parquet", filesystem=layout.fs())
    uris: list[str] = ds.to_table(columns=["uri"]).column("uri").to_pylist()
    return uris


def plan_work(
    layout: Layout,
    listing: pa.Table,
    *,
    model_version: str,
    full: bool,
    resumed_shards: list[Shard],
) -> tuple[Work, list[str]]:
    """Listing minus what is already committed (unless ``full``) minus what this run already staged."""
    notes: list[str] = []
    resumed = _resumed_uris(layout, resumed_shards)
    if resumed_shards:
        notes.append(f"resumed: {len(resumed)} image(s) already staged by an earlier attempt")
    table = listing
    if resumed:
        table = table.filter(pc.invert(pc.is_in(table["uri"], value_set=pa.array(resumed, pa.string()))))
    prev = None if full else previous_rows(layout, model_version)
    if prev is None:
        work = table.append_column("prev_hash", pa.nulls(table.num_rows, pa.string()))
        return Work(table=work.cast(WORK_SCHEMA), unchanged=0, resumed_uris=resumed), notes
    rows = _diff(table, prev)
    same = rows["same"]
    unchanged = int(pc.sum(same).as_py() or 0)
    work = rows.filter(pc.invert(same)).drop_columns(["same"])
    if unchanged:
        notes.append(f"incremental: {unchanged} image(s) unchanged since the last committed run of this model")
    return Work(table=work.cast(WORK_SCHEMA), unchanged=unchanged, resumed_uris=resumed), notes


def _diff(cur: pa.Table, prev: pa.Table) -> pa.Table:
    """Every listed row, with ``same`` (settled by ``prev``) and ``prev_hash`` (when only the bytes can tell)."""
    import duckdb

    con = duckdb.connect()
    con.register("cur", cur)
    con.register("prev", prev)
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
    return rows


# --------------------------------------------------------------------------------------------- concurrent runs
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
        for m in commit.committed_manifests(layout)
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
    con.register("staged", staged.select(_IDENTITY_COLS))
    con.register("other", other.select(_IDENTITY_COLS))
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


def drop_committed_meanwhile(
    layout: Layout, run_id: str, state: dict[str, Any], model_version: str, shards: list[Shard]
) -> tuple[list[Shard], int, list[str]]:
    """Unstage rows whose image another run committed (same model, same bytes) after this run planned.

    Two runs started at once plan the same new images; the second to take the commit lock drops them here, so
    each image is committed once. Shards are rewritten in place (parquet, then stats): idempotent on a rerun.
    Returns (shards to commit, rows dropped, the runs that committed meanwhile).
    """
    other, meanwhile = committed_meanwhile(
        layout,
        model_version=model_version,
        run_id=run_id,
        known_runs=state.get("known_runs"),
        started_at=state["started_at"],
    )
    if other is None:
        return shards, 0, meanwhile
    kept: list[Shard] = []
    dropped = 0
    for shard in sorted(shards, key=lambda s: s.index):
        table = commit.read_shard(layout, shard)
        dup = already_committed(table, other)
        n_dup = int(pc.sum(dup).as_py() or 0)
        dropped += n_dup
        if n_dup == table.num_rows:
            commit.remove_shard(layout, run_id, shard)
            continue
        if n_dup or int(shard.stats.get("rows", -1)) != table.num_rows:
            timing = {k: float(shard.stats[k]) for k in _TIMING_STATS if k in shard.stats}
            shard = commit.write_shard(layout, run_id, shard.index, table.filter(pc.invert(dup)), timing)
        kept.append(shard)
    if dropped:
        log.warning("run %s: %d image(s) were committed meanwhile by %s; dropped", run_id, dropped, meanwhile)
    return kept, dropped, meanwhile
