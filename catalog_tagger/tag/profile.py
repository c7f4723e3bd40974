"""A run's profile: per task, the label counts, rows, mean confidence and low-confidence share of its committed rows
(a regression task: mean, std, min, max, and counts per bin of its range as its "labels").

Read out of core with DuckDB (``diff.duckdb_session``, under a memory limit): local data files by path, files on an
object store streamed through pyarrow + fsspec, only the status and the task's columns. The profile goes into the
run manifest (``profile``) and is what ``drift.detect`` compares between runs.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as pads

from catalog_tagger.kinds import kind_of
from catalog_tagger.schema import STATUS_OK
from catalog_tagger.storage import filesystem, is_local, retry_transient, strip
from catalog_tagger.tag import writer
from catalog_tagger.tag.diff import duckdb_session

if TYPE_CHECKING:
    import duckdb

    from catalog_tagger.config import TaskConfig, TaskSpec

log = logging.getLogger(__name__)

DUCKDB_MEMORY = "256MB"  # the aggregates spill beyond this; a task's columns of millions of rows stream through
NO_LABEL = "(none)"  # a multilabel row with none of the labels is counted under this name
_STREAM = "profile_stream"  # the name a streamed source is registered under, for one query


@dataclass(frozen=True)
class _KindSql:
    """How a kind's columns read as a profile: the row's labels as a list, and its confidence."""

    labels: str  # SQL list expression over the task's columns (``{c}``: the task name)
    confidence: str  # SQL float expression: the row's confidence


# Keyed by kind name: a new kind adds its line here (a missing one is refused with its name, never mis-profiled).
KIND_SQL = {
    "multiclass": _KindSql(labels='["{c}"]', confidence='"{c}_score"'),  # the arg-max label and its probability
    # every label at or over its threshold ("(none)" when none is); confidence: the highest label probability
    "multilabel": _KindSql(
        labels=f"""CASE WHEN len("{{c}}") = 0 THEN ['{NO_LABEL}'] ELSE "{{c}}" END""",
        confidence='list_max("{c}_scores")',
    ),
}


HISTOGRAM_BINS = 10  # a regression task's range cut into this many equal bins (plus one below, one above)


def empty_task(kind: str) -> dict[str, Any]:
    """The profile of a task with no rows."""
    return {"kind": kind, "rows": 0, "labels": {}, "mean_confidence": None, "low_confidence_share": None}


def profile_files(
    output: str,
    storage_options: dict[str, Any] | None,
    paths: list[str],
    tasks: TaskConfig,
    *,
    low_confidence: float = 0.5,
) -> dict[str, Any]:
    """``{"tasks": {task: {kind, rows, labels, mean_confidence, low_confidence_share}}}`` over the ok rows of the
    data files ``paths`` (relative to the predictions table, as ``writer.StagedFile.path``). A task's rows are the
    ok rows that carry its prediction; a task whose columns the files lack is left out (logged)."""
    if not paths:
        return {"tasks": {t.name: empty_task(t.kind) for t in tasks.tasks}}
    uris = [writer.data_uri(output, p) for p in paths]
    source = _Source(uris, storage_options)
    present = source.columns()
    con = duckdb_session(DUCKDB_MEMORY)
    try:
        out: dict[str, Any] = {}
        for task in tasks.tasks:
            needed = [task.name, task.name + kind_of(task).score_column]
            if not set(needed) <= present:
                log.warning("profile: the data files lack column(s) %s of task %r; task left out", needed, task.name)
                continue
            out[task.name] = _profile_task(con, source, task, low_confidence)
    finally:
        con.close()
    return {"tasks": out}


@dataclass(frozen=True)
class _Source:
    """The data files of one run: a DuckDB ``FROM`` over them, made again for each query (a stream reads once)."""

    uris: list[str]
    storage_options: dict[str, Any] | None

    @property
    def local(self) -> bool:
        """Local files DuckDB can read by path (it reads ``*``, ``?`` and ``[`` in a path as a glob)."""
        return all(is_local(u) and not any(ch in strip(u) for ch in "*?[") for u in self.uris)

    def columns(self) -> set[str]:
        """Column names of the first file (a run's files share one schema)."""
        import pyarrow.parquet as pq

        fs = filesystem(self.uris[0], self.storage_options)
        path = strip(self.uris[0])
        schema = retry_transient(partial(pq.read_schema, path, filesystem=fs), f"read {path}")
        return set(schema.names)

    def query(
        self, con: duckdb.DuckDBPyConnection, columns: list[str], sql: str, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Every row of ``sql``, whose ``{src}`` reads the files' status and ``columns``: local files by path
        (DuckDB's own reader), others streamed through pyarrow + fsspec (registered for this query only)."""
        if self.local:
            files = ", ".join("'" + strip(u).replace("'", "''") + "'" for u in self.uris)
            return con.execute(sql.replace("{src}", f"read_parquet([{files}])"), params).fetchall()
        fs = filesystem(self.uris[0], self.storage_options)
        ds = pads.dataset([strip(u) for u in self.uris], format="parquet", filesystem=fs)
        scan = ds.scanner(columns=["status", *columns], batch_size=65_536, batch_readahead=2, fragment_readahead=1)
        con.register(_STREAM, scan.to_reader())
        try:
            return con.execute(sql.replace("{src}", _STREAM), params).fetchall()
        finally:
            con.unregister(_STREAM)


def _profile_task(con: duckdb.DuckDBPyConnection, source: _Source, task: TaskSpec, low: float) -> dict[str, Any]:
    """One task's profile: two aggregates (per row, per label) over the ok rows that carry its prediction."""
    if kind_of(task).numeric:  # a number per row (regression): no labels, no confidence
        return _profile_values(con, source, task)
    sql = KIND_SQL.get(task.kind)
    if sql is None:
        raise NotImplementedError(f"profile: no profile for task kind {task.kind!r} (add it to KIND_SQL)")
    c = task.name  # a valid column name (config.py): lowercase letters, digits, '_'
    columns = [task.name, task.name + kind_of(task).score_column]
    where = f"status = '{STATUS_OK}' AND \"{c}\" IS NOT NULL"
    conf = sql.confidence.format(c=c)

    def stats() -> list[tuple[Any, ...]]:
        q = f"SELECT count(*), avg({conf}), count(*) FILTER (WHERE {conf} < $low), count({conf}) FROM {{src}}"
        return source.query(con, columns, f"{q} WHERE {where}", {"low": low})

    def labels() -> list[tuple[Any, ...]]:
        inner = f"SELECT unnest({sql.labels.format(c=c)}) AS label FROM {{src}} WHERE {where}"
        return source.query(con, columns, f"SELECT label, count(*) FROM ({inner}) GROUP BY label ORDER BY label")

    [(rows, mean, lows, scored)] = retry_transient(stats, f"profile {task.name}")
    counts = retry_transient(labels, f"profile {task.name} labels")
    if not rows:
        return empty_task(task.kind)
    return {
        "kind": task.kind,
        "rows": int(rows),
        "labels": {str(label): int(n) for label, n in counts},
        "mean_confidence": None if mean is None else float(mean),
        "low_confidence_share": float(lows) / scored if scored else None,
    }


def bin_labels(lo: float, hi: float, bins: int = HISTOGRAM_BINS) -> list[str]:
    """Names of the histogram bins of [lo, hi]: ``< lo``, ``[a, b)`` per bin, ``>= hi`` (in value order)."""
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    return [f"< {lo:.4g}", *(f"[{a:.4g}, {b:.4g})" for a, b in itertools.pairwise(edges)), f">= {hi:.4g}"]


def bin_sql(column: str, lo: float, hi: float, bins: int = HISTOGRAM_BINS) -> str:
    """SQL: the index of a value's bin in ``bin_labels`` (0: under ``lo``; ``bins + 1``: at or over ``hi``)."""
    w = (hi - lo) / bins
    return (
        f"CASE WHEN {column} < {lo!r} THEN 0 WHEN {column} >= {hi!r} THEN {bins + 1} "
        f"ELSE least(CAST(floor(({column} - {lo!r}) / {w!r}) AS INTEGER), {bins - 1}) + 1 END"
    )


def _profile_values(con: duckdb.DuckDBPyConnection, source: _Source, task: TaskSpec) -> dict[str, Any]:
    """A regression task's profile: rows, mean, std, min and max of its values; with a ``range``, the counts per
    bin of it as ``labels`` (so ``drift.psi`` compares runs as it does label shares). No confidence: None."""
    c = f'"{task.name}"'  # a valid column name (config.py)
    where = f"status = '{STATUS_OK}' AND {c} IS NOT NULL AND isfinite({c})"

    def stats() -> list[tuple[Any, ...]]:
        q = f"SELECT count(*), avg({c}), stddev_pop({c}), min({c}), max({c}) FROM {{src}} WHERE {where}"
        return source.query(con, [task.name], q)

    def bins(lo: float, hi: float) -> list[tuple[Any, ...]]:
        b = bin_sql(c, lo, hi)
        return source.query(con, [task.name], f"SELECT {b} AS b, count(*) FROM {{src}} WHERE {where} GROUP BY b")

    [(rows, mean, std, lo, hi)] = retry_transient(stats, f"profile {task.name}")
    if not rows:
        return empty_task(task.kind)
    labels: dict[str, int] = {}
    if task.range is not None:
        names = bin_labels(*task.range)
        found = retry_transient(partial(bins, *task.range), f"profile {task.name} bins")
        labels = {names[int(b)]: int(n) for b, n in sorted(found)}
    return {
        **empty_task(task.kind),
        "rows": int(rows),
        "labels": labels,
        "mean": float(mean),
        "std": None if std is None else float(std),
        "min": float(lo),
        "max": float(hi),
    }
