"""SQL over an output root (DuckDB views of committed runs only) and nearest-image search over the embeddings."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from datetime import date, datetime
from typing import Any

import duckdb
import pyarrow as pa

from catalog_tagger.errors import UserError
from catalog_tagger.schema import BASE_FIELDS, RUNS_TYPE, STATUS_OK, RunCounts, RunManifest, RunTimings
from catalog_tagger.storage import filesystem, is_local, strip
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag.commit import Layout

log = logging.getLogger(__name__)

VIEWS = ("predictions", "latest", "runs")
# DuckDB expands these in file paths (and cannot escape them): a committed file whose path has one would be
# globbed instead of read, so we refuse rather than read the wrong files.
_GLOB_CHARS = ("*", "?", "[")
_TS = pa.timestamp("us", tz="UTC")


# The `runs` table: one row per committed run, the manifest flattened. (column, manifest path, type)
# The run's own fields, counts.* and timings.* come from the manifest model (schema.RunManifest): every field it
# marks as a runs column is one, under its own name. savings.* (accounting.Savings) keep their key too, except
# savings.tasks (a count), which is `n_tasks` beside `tasks` (the task names).
def _manifest_columns(model: type, path: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], pa.DataType]]:
    return [(f.name, (*path, f.name), f.metadata[RUNS_TYPE]) for f in fields(model) if RUNS_TYPE in f.metadata]


RUNS_COLUMNS: tuple[tuple[str, tuple[str, ...], pa.DataType], ...] = (
    *_manifest_columns(RunManifest),
    *_manifest_columns(RunCounts, ("counts",)),
    *_manifest_columns(RunTimings, ("timings",)),  # decode_cpu_s: same value as savings.decode_cpu_s
    ("images", ("savings", "images"), pa.int64()),
    ("n_tasks", ("savings", "tasks"), pa.int64()),
    ("device", ("savings", "device"), pa.string()),
    ("multi_head_accel_s", ("savings", "multi_head_accel_s"), pa.float64()),
    ("single_task_accel_s", ("savings", "single_task_accel_s"), pa.float64()),
    ("multi_head_accel_hours", ("savings", "multi_head_accel_hours"), pa.float64()),
    ("single_task_accel_hours", ("savings", "single_task_accel_hours"), pa.float64()),
    ("accel_hours_saved", ("savings", "accel_hours_saved"), pa.float64()),
    ("fraction_saved", ("savings", "fraction_saved"), pa.float64()),
    ("price_per_hour", ("savings", "price_per_hour"), pa.float64()),
    ("cost_saved", ("savings", "cost_saved"), pa.float64()),
    ("decode_cpu_s_saved", ("savings", "decode_cpu_s_saved"), pa.float64()),
    ("method", ("savings", "method"), pa.string()),
    ("files", ("files",), pa.int32()),  # number of part files
    ("bytes", ("files",), pa.int64()),  # their total size
)
RUNS_SCHEMA = pa.schema([pa.field(name, typ) for name, _, typ in RUNS_COLUMNS])


# --------------------------------------------------------------------------------------------- connection
def _dig(m: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = m
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def _runs_value(m: dict[str, Any], name: str, path: tuple[str, ...], typ: pa.DataType) -> Any:
    if name == "files":
        return len(m.get("files") or [])
    if name == "bytes":
        return sum(int(f.get("bytes") or 0) for f in m.get("files") or [])
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


def sql_string(s: str) -> str:
    """A SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    """A quoted SQL identifier (column names are task names: any text)."""
    return '"' + name.replace('"', '""') + '"'


def read_parquet_sql(files: list[str]) -> str:
    """``read_parquet([...])`` over exactly these files, columns unified by name across runs.

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


def _empty_predictions() -> pa.Table:
    fields = [*BASE_FIELDS, pa.field("embedding", pa.list_(pa.float32())), pa.field("tagged_at", _TS)]
    fields.append(pa.field("run_date", pa.date32()))
    return pa.schema(fields).empty_table()


@dataclass(frozen=True)
class Catalog:
    """What ``connect`` found: the connection, the committed manifests (oldest first) and their files."""

    con: duckdb.DuckDBPyConnection
    manifests: list[dict[str, Any]]
    layout: Layout

    def manifest(self, run_id: str | None = None) -> dict[str, Any]:
        """One committed run's manifest; the latest committed run when ``run_id`` is None."""
        if not self.manifests:
            raise UserError(f"no committed runs under {self.layout.output}")
        if run_id is None:
            return self.manifests[-1]
        for m in self.manifests:
            if m.get("run_id") == run_id:
                return m
        recent = ", ".join(m.get("run_id", "?") for m in self.manifests[-5:])
        raise UserError(f"run {run_id!r} is not committed under {self.layout.output} (latest runs: {recent})")

    def files(self, manifest: dict[str, Any]) -> list[str]:
        """The absolute URIs of the part files a run's manifest lists."""
        return [self.layout.abs(f["path"]) for f in manifest.get("files", [])]


def open_catalog(output: str, storage_options: dict[str, Any] | None = None) -> Catalog:
    """Build the DuckDB views over ``output`` and return them with the manifests they were built from."""
    layout = Layout(output, storage_options)
    fs = filesystem(output, storage_options)
    if not fs.exists(strip(output)):
        raise UserError(f"output {output!r} does not exist")
    manifests = ledger.committed_manifests(layout)
    con = duckdb.connect()
    if not is_local(output):
        # DuckDB reads remote files through the same fsspec filesystem (and credentials) as the job.
        con.register_filesystem(fs)
    con.from_arrow(runs_table(manifests)).create("runs")
    files = [layout.abs(f["path"]) for m in manifests for f in m.get("files", [])]
    if files:
        # run_date (the partition, not a column of the files) comes from the manifests, the source of truth.
        try:
            con.execute(
                f"CREATE VIEW predictions AS SELECT p.*, r.run_date FROM {read_parquet_sql(files)} AS p "
                "LEFT JOIN (SELECT run_id AS _rid, run_date FROM runs) AS r ON p.run_id = r._rid"
            )
        except duckdb.Error as err:
            con.close()
            raise UserError(
                f"cannot read the files committed under {output} ({err}); a run's files were deleted or moved "
                "without its manifest: remove runs/<run_id>.json first when dropping a run"
            ) from None
    else:
        log.warning("no committed runs under %s: the views are empty", output)
        con.from_arrow(_empty_predictions()).create("predictions")
    # Latest ok row per uri: the newest tagging, ties (same start second) broken by the run that finished last.
    con.execute(
        f"""
        CREATE VIEW latest AS
        SELECT p.* FROM predictions AS p
        LEFT JOIN (SELECT run_id AS _rid, finished_at AS _fin FROM runs) AS r ON p.run_id = r._rid
        WHERE p.status = {sql_string(STATUS_OK)}
        QUALIFY row_number() OVER (PARTITION BY p.uri ORDER BY p.tagged_at DESC, r._fin DESC NULLS LAST,
                                   p.run_id DESC) = 1
        """
    )
    log.debug("query views over %s: %d run(s), %d file(s)", output, len(manifests), len(files))
    return Catalog(con=con, manifests=manifests, layout=layout)


def connect(output: str, storage_options: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``predictions``, ``latest`` and ``runs`` over ``output``.

    Only files listed in committed run manifests are read (never a glob of the predictions folder), so a
    crashed or uncommitted run is invisible. An output with no committed runs gives empty views.
    """
    return open_catalog(output, storage_options).con


# What ``query`` runs once locked: reads, and objects in the connection's memory. Not COPY, EXPORT, ATTACH or
# LOAD/INSTALL: DuckDB lets an allowed path be written as well as read.
_LOCKED_STATEMENTS = frozenset({"SELECT", "EXPLAIN", "PRAGMA", "CALL", "SET", "VARIABLE_SET", "CREATE", "DROP",
                                "ALTER", "INSERT", "UPDATE", "DELETE", "PREPARE", "EXECUTE", "TRANSACTION",
                                "MULTI"})  # fmt: skip


def lock_down(cat: Catalog) -> None:
    """Turn DuckDB's external access off (``read_csv('/proc/self/environ')``, ``COPY ... TO``, ``INSTALL`` fail)
    but for the committed files the views read lazily, and lock the configuration so SQL cannot undo it."""
    allowed = {f for m in cat.manifests for f in cat.files(m)}
    if not is_local(cat.layout.output):  # DuckDB names a registered filesystem's files as fsspec's glob does
        fs = cat.layout.fs()
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
