"""Where predicted rows go: data files of the history table, written by ``writer.PartWriter``.

The Ray executor runs the writer as its last stage (write tasks on any node; the driver receives one stats row per
file, ``Totals.add_stats``). The local executor feeds ``Sink``, which groups rows into files in this process: a file
every ``rows_per_shard`` rows, and sooner once the oldest pending row waited ``shard_seconds``, so a Ctrl-C or a
crash loses at most that much work and a small run can resume too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.schema import STATUS_UNCHANGED
from catalog_tagger.tag.writer import PartWriter

log = logging.getLogger(__name__)


@dataclass
class Totals:
    """What this attempt wrote (earlier attempts' files carry their own counts in their sidecars)."""

    ok: int = 0  # rows written with status ok
    error: int = 0  # rows written with status error
    unchanged: int = 0  # rows whose bytes matched the last committed row (not written)
    duplicates: int = 0  # rows delivered twice within this attempt (local: dropped here; Ray: at the commit)
    files: int = 0  # data files written

    @property
    def done(self) -> int:
        return self.ok + self.error + self.unchanged

    def add_stats(self, stats: pa.Table) -> None:
        """Add write tasks' stats rows (``writer.STATS_SCHEMA``)."""
        for key in ("ok", "error", "unchanged"):
            setattr(self, key, getattr(self, key) + int(pc.sum(stats.column(key)).as_py() or 0))
        self.files += int(pc.sum(pc.is_valid(stats.column("path"))).as_py() or 0)


@dataclass
class Sink:
    """Groups the local executor's rows into data files (see the module docstring); dedups by uri."""

    writer: PartWriter
    rows_per_shard: int
    shard_seconds: float = math.inf  # write what is pending once its oldest row waited this long
    totals: Totals = field(default_factory=Totals)
    _seen: set[str] = field(default_factory=set, init=False, repr=False)
    _pending: list[pa.Table] = field(default_factory=list, init=False, repr=False)  # rows not yet in a file
    _pending_rows: int = field(default=0, init=False, repr=False)
    _pending_since: float = field(default=0.0, init=False, repr=False)  # monotonic time the oldest pending row came

    def add(self, table: pa.Table) -> int:
        """Take one batch from the predictor; write whole files as they fill. Returns the rows kept."""
        table = self._dedup(table)
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
        """Write what is pending as a smaller file (at the end, or on the time budget)."""
        if self._pending_rows:
            self._write(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def _dedup(self, table: pa.Table) -> pa.Table:
        """Drop rows already seen, and repeats within the batch."""
        uris = table.column("uri").to_pylist()
        first: dict[str, int] = {}
        for i, u in enumerate(uris):
            if u not in self._seen:
                first.setdefault(u, i)
        self.totals.duplicates += len(uris) - len(first)
        self._seen.update(first)
        if len(first) == len(uris):
            return table
        return table.take(pa.array(sorted(first.values()), type=pa.int64()))

    def _write(self, table: pa.Table) -> None:
        staged = self.writer.write(table)
        self.totals.ok += staged.ok
        self.totals.error += staged.error
        self.totals.files += 1
        log.debug("wrote %s (%d rows)", staged.path, staged.rows)
