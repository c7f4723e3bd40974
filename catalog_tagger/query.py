"""SQL over an output root: DuckDB views of its Delta tables, read through their logs (committed runs only)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from catalog_tagger.errors import UserError
from catalog_tagger.figures import savings_keys
from catalog_tagger.schema import BASE_FIELDS, RUNS_TYPE, STATUS_OK, RunCounts, RunManifest, RunTimings
from catalog_tagger.storage import filesystem, is_local, redact, strip
from catalog_tagger.tag import delta

if TYPE_CHECKING:
    from deltalake import DeltaTable
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

VIEWS = ("predictions", "latest", "runs")
# DuckDB expands these in file paths (and cannot escape them): a committed file whose path has one would be
# globbed instead of read, so we refuse rather than read the wrong files.
_GLOB_CHARS = ("*", "?", "[")
_TS = pa.timestamp("us", tz="UTC")


_SAVINGS_TYPES = {k: pa.int64() for k in ("images", "tasks", "devices")} | {
    k: pa.string() for k in ("device", "method", "price_unit")
}


# The `runs` table: one row per committed run, the manifest flattened. (column, manifest path, type)
# The run's own fields, counts.* and timings.* come from the manifest model (schema.RunManifest): every field it
# marks as a runs column is one, under its own name. savings.* (figures.savings_keys) keep their key too, except
# savings.tasks (a count), which is `n_tasks` beside `tasks` (the task names).
def _manifest_columns(model: type, path: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], pa.DataType]]:
    return [(f.name, (*path, f.name), f.metadata[RUNS_TYPE]) for f in fields(model) if RUNS_TYPE in f.metadata]


RUNS_COLUMNS: tuple[tuple[str, tuple[str, ...], pa.DataType], ...] = (
    *_manifest_columns(RunManifest),
    *_manifest_columns(RunCounts, ("counts",)),
    *_manifest_columns(RunTimings, ("timings",)),  # decode_cpu_s: same value as savings.decode_cpu_s
    *(
        ("n_tasks" if key == "tasks" else key, ("savings", key), _SAVINGS_TYPES.get(key, pa.float64()))
        for key in savings_keys()
        if key != "decode_cpu_s"  # the timings' column, same value
    ),
    # health (manifest version 5; null before): ok | warning | failed, and the error budget
    ("health_status", ("health", "status"), pa.string()),
    ("error_fraction", ("health", "error_fraction"), pa.float64()),
    ("max_error_fraction", ("health", "max_error_fraction"), pa.float64()),
)
RUNS_SCHEMA = pa.schema([pa.field(name, typ) for name, _, typ in RUNS_COLUMNS])


# --------------------------------------------------------------------------------------------- runs
def _dig(m: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = m
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def _runs_value(m: dict[str, Any], name: str, path: tuple[str, ...], typ: pa.DataType) -> Any:
    v = _dig(m, path)
    if name == "decode_cpu_s" and v is None:
        v = _dig(m, ("savings", "decode_cpu_s"))
    if v is None:
        return None
    if typ == _TS:
        return datetime.fromisoformat(v)
    if typ == pa.date32():
        return date.fromisoformat(v)
    return v


def runs_table(manifests: list[dict[str, Any]]) -> pa.Table:
    """The ``runs`` table: one row per committed run, manifest fields flattened (see ``RUNS_COLUMNS``)."""
    cols = {name: [_runs_value(m, name, path, typ) for m in manifests] for name, path, typ in RUNS_COLUMNS}
    return pa.table(cols, schema=RUNS_SCHEMA)


# --------------------------------------------------------------------------------------------- SQL text
def sql_string(s: str) -> str:
    """A SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    """A quoted SQL identifier (column names are task names: any text)."""
    return '"' + name.replace('"', '""') + '"'


def read_parquet_sql(files: list[str]) -> str:
    """``read_parquet([...])`` over exactly these files, columns unified by name (new task columns).

    Hive partitioning is off: DuckDB would turn every ``key=value`` folder of the path into a column, including
    folders above the output root (``/data/env=prod/out``), and such a column could shadow a data column.
    """
    for f in files:
        if any(c in f for c in _GLOB_CHARS):
            raise UserError(
                f"committed file {f!r} has a glob character ({' '.join(_GLOB_CHARS)}) in its path, which DuckDB "
                "would expand instead of reading the file; move the output to a path without them"
            )
    listed = ", ".join(sql_string(f) for f in files)
    return f"read_parquet([{listed}], union_by_name = true, hive_partitioning = false)"


# --------------------------------------------------------------------------------------------- connection
def _identity_fields() -> list[pa.Field]:
    return [*BASE_FIELDS, pa.field("tagged_at", _TS)]


def _empty_predictions() -> pa.Table:
    fields = [*BASE_FIELDS, pa.field("embedding", pa.list_(pa.float32())), pa.field("tagged_at", _TS)]
    return pa.schema([*fields, pa.field(delta.PARTITION, pa.date32())]).empty_table()


def refuse_v1(fs: AbstractFileSystem, output: str) -> None:
    """An output in the v1 layout (run folders of Parquet parts and JSON manifests, no Delta log): refused, with
    how to convert it. Without a ``predictions`` table, a ``runs/*.json`` can only come from v1 (v2 writes that
    copy after a commit)."""
    root = strip(output).rstrip("/")
    if fs.glob(f"{root}/runs/*.json") or fs.glob(f"{root}/{delta.PREDICTIONS}/run_date=*/run_id=*"):
        raise UserError(
            f"{redact(output)} is in the v1 output layout (predictions/ without a Delta log): run "
            f"`catalog-tagger migrate --output {redact(output)}` to convert it to Delta tables"
        )


@dataclass(frozen=True)
class Catalog:
    """What ``open_catalog`` found: the connection, the committed runs' manifests (commit order), the history
    table (None before the first commit) and the files DuckDB reads by path (``latest``'s)."""

    con: duckdb.DuckDBPyConnection
    manifests: list[dict[str, Any]]
    output: str
    storage_options: dict[str, Any] | None
    history: DeltaTable | None
    read_files: list[str]

    def manifest(self, run_id: str | None = None) -> dict[str, Any]:
        """One committed run's manifest; the latest committed run when ``run_id`` is None."""
        if not self.manifests:
            raise UserError(f"no committed runs under {self.output}")
        if run_id is None:
            return self.manifests[-1]
        for m in self.manifests:
            if m.get("run_id") == run_id:
                return m
        recent = ", ".join(m.get("run_id", "?") for m in self.manifests[-5:])
        raise UserError(f"run {run_id!r} is not committed under {self.output} (latest runs: {recent})")


def _create_latest(con: duckdb.DuckDBPyConnection, output: str, opts: Any, runs: list[delta.CommittedRun]) -> list[str]:
    """The ``latest`` view: ``OUT/latest``'s ok rows, with ``run_date`` from ``runs``; returns the files it reads.

    DuckDB reads its files itself, listed by the table's log: MERGE writes them with string-view types in their
    Arrow schema, which pyarrow's dataset filters cannot compare with plain strings (a registered dataset would
    fail on ``WHERE garment = 'x'``); the table is small (no embedding) and has few files.
    """
    table = delta.open_table(delta.table_uri(output, delta.LATEST), opts)
    if runs and (table is None or table.transaction_version(delta.LATEST_APP + runs[-1].run_id) is None):
        log.warning(
            "latest does not hold run %s yet (it is merged after each commit); the next run or "
            "`catalog-tagger maintain --output %s` catches it up",
            runs[-1].run_id,
            redact(output),
        )
    files = [] if table is None else list(table.file_uris())
    if files:
        source = read_parquet_sql(files)
    else:
        con.from_arrow(pa.schema(_identity_fields()).empty_table()).create("_latest_empty")
        source = "_latest_empty"
    con.execute(
        f"CREATE VIEW latest AS SELECT l.*, r.run_date FROM {source} AS l "
        "LEFT JOIN (SELECT run_id AS _rid, run_date FROM runs) AS r ON l.run_id = r._rid "
        f"WHERE l.status = {sql_string(STATUS_OK)}"
    )
    return files


def _open_history(output: str, storage_options: dict[str, Any] | None) -> tuple[AbstractFileSystem, DeltaTable | None]:
    """The output's filesystem and predictions table (None before the first run); a missing output or one in the
    v1 layout is a ``UserError``."""
    fs = filesystem(output, storage_options)
    if not fs.exists(strip(output)):
        raise UserError(f"output {output!r} does not exist")
    opts = delta.delta_options(output, storage_options)
    history = delta.open_table(delta.table_uri(output, delta.PREDICTIONS), opts)
    if history is None:
        refuse_v1(fs, output)
    return fs, history


def run_manifests(output: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The committed runs' manifests, oldest first, read from the Delta log (no data file is read)."""
    _, history = _open_history(output, storage_options)
    return [] if history is None else [r.manifest for r in delta.all_runs(history)]


def open_catalog(output: str, storage_options: dict[str, Any] | None = None) -> Catalog:
    """Build the DuckDB views over ``output`` (see ``connect``) and return them with what they were built from."""
    fs, history = _open_history(output, storage_options)
    opts = delta.delta_options(output, storage_options)
    runs = [] if history is None else delta.all_runs(history)
    con = duckdb.connect()
    if not is_local(output):
        # DuckDB reads latest's files through the same fsspec filesystem (and credentials) as the job.
        con.register_filesystem(fs)
    con.from_arrow(runs_table([r.manifest for r in runs])).create("runs")
    if history is None:
        log.warning("no committed runs under %s: the views are empty", redact(output))
        con.from_arrow(_empty_predictions()).create("predictions")
    else:
        con.register("predictions", delta.dataset(history))
    try:
        files = _create_latest(con, output, opts, runs)
    except duckdb.Error as err:
        con.close()
        raise UserError(
            f"cannot read the latest table of {redact(output)} ({err}): run `catalog-tagger maintain`"
        ) from None
    log.debug("query views over %s: %d run(s)", redact(output), len(runs))
    manifests = [r.manifest for r in runs]
    return Catalog(con, manifests, output, storage_options, history, files)


def connect(output: str, storage_options: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``predictions``, ``latest`` and ``runs`` over ``output``.

    Every table is read through its Delta log (never a glob of the folder), so a crashed or uncommitted run, a
    staging folder or a file compaction replaced is invisible. An output with no committed runs gives empty views;
    one in the v1 layout is refused (``catalog-tagger migrate`` converts it).
    """
    return open_catalog(output, storage_options).con


# What ``query`` runs once locked: reads, and objects in the connection's memory. Not COPY, EXPORT, ATTACH or
# LOAD/INSTALL: DuckDB lets an allowed path be written as well as read.
_LOCKED_STATEMENTS = frozenset({"SELECT", "EXPLAIN", "PRAGMA", "CALL", "SET", "VARIABLE_SET", "CREATE", "DROP",
                                "ALTER", "INSERT", "UPDATE", "DELETE", "PREPARE", "EXECUTE", "TRANSACTION",
                                "MULTI"})  # fmt: skip


def lock_down(cat: Catalog) -> None:
    """Turn DuckDB's external access off (``read_csv('/proc/self/environ')``, ``COPY ... TO``, ``INSTALL`` fail)
    but for the files the ``latest`` view reads lazily, and lock the configuration so SQL cannot undo it.
    ``predictions`` is a registered Arrow dataset: DuckDB scans it without any file access of its own."""
    allowed = set(cat.read_files)
    if not is_local(cat.output):  # DuckDB names a registered filesystem's files as fsspec's glob does
        fs = filesystem(cat.output, cat.storage_options)
        allowed |= {fs.unstrip_protocol(fs._strip_protocol(f)) for f in allowed}
    cat.con.execute(f"SET allowed_paths = [{', '.join(sql_string(f) for f in sorted(allowed))}]")
    cat.con.execute("SET enable_external_access = false")
    cat.con.execute("SET lock_configuration = true")


def check_locked_sql(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse, before running any, statements that write or load files."""
    try:
        refused = sorted({k for st in con.extract_statements(sql) if (k := st.type.name) not in _LOCKED_STATEMENTS})
    except duckdb.Error as err:
        raise UserError(f"query failed: {err}") from None
    if refused:
        raise UserError(
            f"query: {', '.join(refused)} statements are refused (they write or load files); use --format/--out to "
            "save a result, or --unsafe-sql for unrestricted DuckDB (only with SQL you wrote yourself)"
        )


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pa.Table:
    """Run ``sql``; DuckDB's own message becomes a ``UserError``. Statements without a result give an empty table."""
    try:
        if params:
            return con.sql(sql, params=params).to_arrow_table()
        rel = con.sql(sql)
        return pa.table({}) if rel is None else rel.to_arrow_table()
    except duckdb.Error as err:
        raise UserError(f"query failed: {err}") from None


def query(
    output: str,
    sql: str,
    *,
    storage_options: dict[str, Any] | None = None,
    params: list[Any] | None = None,
    unsafe_sql: bool = False,
) -> pa.Table:
    """Run SQL (the last statement's result) over ``output``'s views, locked down unless ``unsafe_sql``."""
    cat = open_catalog(output, storage_options)
    try:
        if not unsafe_sql:
            lock_down(cat)
            check_locked_sql(cat.con, sql)
        return run_sql(cat.con, sql, params)
    finally:
        cat.con.close()


# --------------------------------------------------------------------------------------------- result formats
def _plain(v: Any) -> Any:
    """A JSON-safe value: timestamps as ISO strings, NaN/inf as null, bytes as hex."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, int | float | str | bool) or v is None:
        return v
    return str(v)


def to_json_lines(table: pa.Table) -> bytes:
    """One JSON object per row (JSON Lines)."""
    return b"".join(
        json.dumps(_plain(row), ensure_ascii=False).encode() + b"\n"
        for row in table.to_pylist(maps_as_pydicts="strict")
    )


def to_csv(table: pa.Table) -> bytes:
    """CSV with a header; nested values (lists, structs, maps) are written as JSON text."""
    import pyarrow.csv as pacsv

    cols = []
    for field, col in zip(table.schema, table.columns, strict=True):
        if pa.types.is_nested(field.type):
            text = [None if v is None else json.dumps(_plain(v), ensure_ascii=False) for v in col.to_pylist()]
            cols.append(pa.array(text, pa.string()))
        else:
            cols.append(col)
    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.table(cols, names=table.column_names), sink)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def to_parquet(table: pa.Table) -> bytes:
    """The table as one zstd-compressed Parquet file."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data: bytes = sink.getvalue().to_pybytes()
    return data
