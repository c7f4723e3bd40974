"""The sink (driver side): dedup rows by uri, stage a part file every N rows or N seconds, keep the run's totals."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.schema import ACCEL_COL, CALIB_COL, DECODE_COL, STATUS_UNCHANGED
from catalog_tagger.tag import commit
from catalog_tagger.tag.commit import Layout, Shard

log = logging.getLogger(__name__)

# Internal per-row seconds -> the shard stats key they are summed into.
_TIMING_COLS = {"accel_s": ACCEL_COL, "single_s": CALIB_COL, "decode_s": DECODE_COL}


@dataclass
class Totals:
    """What the sink saw in this attempt (earlier attempts' shards carry their own stats)."""

    ok: int = 0  # rows staged with status ok
    error: int = 0  # rows staged with status error
    unchanged: int = 0  # rows whose bytes matched the last committed row (not staged)
    duplicates: int = 0  # rows delivered twice (Ray is at-least-once) or already staged (resumed): dropped


@dataclass
class Sink:
    """Stages the rows of one run under ``_staging/<run_id>/``, ``rows_per_shard`` rows per part file, and sooner
    once the oldest unstaged row waited ``shard_seconds``: a staged part is what an interrupted run resumes from,
    so the time budget bounds what a Ctrl-C or a crash loses, and lets a run under ``rows_per_shard`` rows resume.

    Ray Data delivers each batch at least once (a retried batch arrives again), so rows are deduplicated by uri
    against everything seen, including the uris that earlier attempts staged (``seen``).
    """

    layout: Layout
    run_id: str
    rows_per_shard: int
    shard_seconds: float = math.inf  # stage what is pending once its oldest row waited this long
    seen: set[str] = field(default_factory=set)  # uris staged so far (by this attempt or resumed)
    index: int = 0  # index of the next part file
    shards: list[Shard] = field(default_factory=list)  # staged by this attempt
    totals: Totals = field(default_factory=Totals)
    _pending: list[pa.Table] = field(default_factory=list, init=False, repr=False)  # rows not yet in a part
    _pending_rows: int = field(default=0, init=False, repr=False)
    _pending_since: float = field(default=0.0, init=False, repr=False)  # monotonic time the oldest pending row came

    def add(self, table: pa.Table) -> int:
        """Take one batch from the predictor; stage whole part files as they fill. Returns the rows kept."""
        table = self._dedup(table)
        self.seen.update(table.column("uri").to_pylist())
        unchanged = pc.equal(table.column("status"), STATUS_UNCHANGED)
        self.totals.unchanged += int(pc.sum(unchanged).as_py() or 0)
        table = table.filter(pc.invert(unchanged))
        if table.num_rows and not self._pending_rows:
            self._pending_since = time.monotonic()
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            merged = pa.concat_tables(self._pending)
            self._pending = [merged.slice(self.rows_per_shard)]
            self._pending_rows = merged.num_rows - self.rows_per_shard
            self._write(merged.slice(0, self.rows_per_shard))
            self._pending_since = time.monotonic()
        if self._pending_rows and time.monotonic() - self._pending_since >= self.shard_seconds:
            self.flush()
        return int(table.num_rows)

    def flush(self) -> None:
        """Stage what is pending as a smaller part file (at the end, or on the time budget)."""
        if self._pending_rows:
            self._write(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def _dedup(self, table: pa.Table) -> pa.Table:
        """Drop rows already seen, and repeats within the batch (a batch repeated by a retry appears once)."""
        uris = table.column("uri").to_pylist()
        first: dict[str, int] = {}
        for i, u in enumerate(uris):
            if u not in self.seen:
                first.setdefault(u, i)
        self.totals.duplicates += len(uris) - len(first)
        if len(first) == len(uris):
            return table
        return table.take(pa.array(sorted(first.values()), type=pa.int64()))

    def _write(self, table: pa.Table) -> None:
        timing = {key: float(pc.sum(table.column(col)).as_py() or 0.0) for key, col in _TIMING_COLS.items()}
        table = table.drop_columns(list(_TIMING_COLS.values()))
        with commit.output_errors(self.run_id, self.layout.output):
            shard = commit.write_shard(self.layout, self.run_id, self.index, table, timing)
        self.shards.append(shard)
        self.totals.ok += int(shard.stats["ok"])
        self.totals.error += int(shard.stats["error"])
        self.index += 1
