"""``OUT/latest``: one current row per image, derived from the history after each commit.

A Delta table engines read natively (no window query): every column of the history but the embedding. Each
committed run is merged into it once, in commit order (a MERGE on ``uri`` carrying the application transaction
``catalog-tagger/latest/<run_id>``, so a repeated merge is skipped). Rows that settle an image go in: ``ok`` rows,
and decode errors (retrying the same bytes cannot fix them); a read error (I/O, timeout) never replaces a good row.
The history's commit is the source of truth: a crash between it and the merge is caught up by the next run or by
``maintain`` (``catch_up``). Planning reads this table as the committed state (``state``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.schema import STATUS_OK
from catalog_tagger.tag import delta

if TYPE_CHECKING:
    import pyarrow.dataset as pads
    from deltalake import DeltaTable

log = logging.getLogger(__name__)

DECODE_ERROR_PREFIX = "decode:"  # errors of the bytes themselves: final for these bytes


def settles() -> pc.Expression:
    """Rows that settle their image: ok, or a decode error."""
    return (pc.field("status") == STATUS_OK) | pc.starts_with(pc.field("error"), DECODE_ERROR_PREFIX)


def _merged(latest: DeltaTable, run_id: str) -> bool:
    return latest.transaction_version(delta.LATEST_APP + run_id) is not None


def merge_run(history: DeltaTable, latest: DeltaTable, run_id: str) -> int:
    """Merge one committed run's settling rows into ``latest`` (a no-op when already merged); returns rows merged.

    The source is streamed from the run's files (``run_id`` is a column: the scan reads that run's rows only after
    Parquet statistics prune the rest), so the driver never holds a run.
    """
    from deltalake import CommitProperties, Transaction

    if _merged(latest, run_id):
        return 0
    columns = [f.name for f in pa.schema(latest.schema().to_arrow())]
    ds = delta.dataset(history)
    have = [c for c in columns if c in ds.schema.names]
    scanner = ds.scanner(columns=have, filter=(pc.field("run_id") == run_id) & settles())
    reader = scanner.to_reader()
    target = pa.schema([f for f in pa.schema(latest.schema().to_arrow()) if f.name in have])
    source = pa.RecordBatchReader.from_batches(target, (b.cast(target) for b in reader))
    props = CommitProperties(app_transactions=[Transaction(delta.LATEST_APP + run_id, 1)])
    metrics = (
        latest.merge(
            source,
            predicate="t.uri = s.uri",
            source_alias="s",
            target_alias="t",
            merge_schema=True,
            commit_properties=props,
        )
        .when_matched_update_all(predicate="s.tagged_at >= t.tagged_at")
        .when_not_matched_insert_all()
        .execute()
    )
    rows = int(metrics.get("num_source_rows", 0))
    log.info("latest: merged run %s (%d row(s))", run_id, rows)
    return rows


def catch_up(output: str, storage_options: dict[str, Any] | None, *, runs: int | None = 100) -> list[str]:
    """Merge every committed run not yet in ``latest`` (among the last ``runs`` table versions, or all with
    None); returns the runs merged. Creates ``latest`` on first use."""
    opts = delta.delta_options(output, storage_options)
    history = delta.open_table(delta.table_uri(output, delta.PREDICTIONS), opts)
    if history is None:
        return []
    committed = delta.all_runs(history) if runs is None else delta.runs_after(history, history.version() - runs)
    schema = delta.latest_schema(pa.schema(history.schema().to_arrow()))
    latest = delta.ensure_table(delta.table_uri(output, delta.LATEST), schema, opts)
    done = []
    for run in committed:
        if not _merged(latest, run.run_id):
            merge_run(history, latest, run.run_id)
            latest.update_incremental()
            done.append(run.run_id)
    return done


def state(output: str, storage_options: dict[str, Any] | None) -> pads.Dataset | None:
    """The committed state planning diffs against: ``latest``'s identity columns (None before the first run)."""
    table = delta.open_table(delta.table_uri(output, delta.LATEST), delta.delta_options(output, storage_options))
    if table is None:
        return None
    return delta.dataset(table)
