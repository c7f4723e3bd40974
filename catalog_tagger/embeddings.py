"""The committed embeddings of one model version, read from the output: the ``latest`` rows' vectors (which live in
the history: ``latest`` holds none), in one table (small outputs) or streamed in batches (bounded memory), and the
task columns shown beside them. Shared by ``similar``, ``near_duplicates`` and the ANN index (``ann``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, run_sql, sql_ident, sql_string
from catalog_tagger.schema import STATUS_OK
from catalog_tagger.tag import delta


@dataclass(frozen=True)
class TaskColumn:
    """One task's value column in ``latest``: ``labelled`` when it holds labels (a label or a list of labels), not
    when it holds a number (a regression task's value), which two near-identical images rarely share exactly."""

    name: str
    kind: str | None  # from the run's profile (manifest v5); None for older runs
    labelled: bool


def task_columns(cat: Catalog, model_version: str) -> list[TaskColumn]:
    """The task columns of ``latest`` for ``model_version``'s tasks (the last committed run of that version), in
    task order. Whether a column is a label comes from its type, so any kind (and runs without a profile) is right."""
    tasks: list[str] = []
    kinds: dict[str, Any] = {}
    for m in cat.manifests:
        if m.get("model_version") == model_version:
            tasks = list(m.get("tasks") or [])
            kinds = ((m.get("profile") or {}).get("tasks")) or {}
    types = {name: str(typ).upper() for name, typ, *_ in cat.con.sql("DESCRIBE latest").fetchall()}
    return [
        TaskColumn(t, (kinds.get(t) or {}).get("kind"), types[t] in ("VARCHAR", "VARCHAR[]"))
        for t in tasks
        if t in types
    ]


def normalise(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), so an inner product is the cosine similarity."""
    m = np.ascontiguousarray(m, dtype=np.float32)
    unit: np.ndarray = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    return unit


def matrix_of(batch: pa.RecordBatch | pa.Table, version: str) -> np.ndarray:
    """The ``embedding`` column as a (rows, dim) float32 matrix; mixed lengths are refused."""
    emb = batch.column("embedding")
    if isinstance(emb, pa.ChunkedArray):
        emb = emb.combine_chunks()
    lengths = pc.unique(pc.list_value_length(emb)).to_pylist()
    if len(lengths) > 1:
        raise UserError(f"embeddings of model {version} have mixed lengths {lengths}: the output is inconsistent")
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    matrix: np.ndarray = flat.reshape(len(batch), lengths[0] if lengths else 0)
    return matrix


def _in_runs(runs: list[tuple[str, Any]]) -> str:
    """A filter on ``p``'s partitions (``run_date``) and runs, which the dataset applies before reading a file."""
    dates = sorted({str(d) for _, d in runs if d is not None})
    in_dates = f"p.run_date IN ({', '.join(f'DATE {sql_string(d)}' for d in dates)}) AND " if dates else ""
    return f"{in_dates}p.run_id IN ({', '.join(sql_string(r) for r, _ in runs) or 'NULL'})"


def _latest_runs(cat: Catalog, version: str) -> str:
    found = run_sql(
        cat.con, "SELECT DISTINCT run_id, run_date FROM latest WHERE model_version = ?", [version]
    ).to_pylist()
    return _in_runs([(r["run_id"], r["run_date"]) for r in found])


def source_sql(cat: Catalog, version: str, new_runs: list[delta.CommittedRun] | None = None) -> str:
    """SQL of ``uri, run_id, embedding``: the history rows that are ``latest``'s for ``version`` (``new_runs`` None)
    or every ok row of ``new_runs``. No window and no order: DuckDB streams the scan (``batches``)."""
    ok = f"p.model_version = {sql_string(version)} AND p.status = {sql_string(STATUS_OK)}"
    if new_runs is not None:
        where = _in_runs([(r.run_id, r.manifest.get("run_date")) for r in new_runs])
        return f"SELECT p.uri, p.run_id, p.embedding FROM predictions AS p WHERE {where} AND {ok}"
    # latest holds one row per uri: the join keeps the history row of that run
    return (
        "SELECT p.uri, p.run_id, p.embedding FROM predictions AS p JOIN (SELECT uri, run_id FROM latest WHERE "
        f"model_version = {sql_string(version)}) AS l ON p.uri = l.uri AND p.run_id = l.run_id "
        f"WHERE {_latest_runs(cat, version)} AND {ok}"
    )


def batches(cat: Catalog, sql: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """``sql``'s rows, ``batch_rows`` at a time (empty batches skipped)."""
    reader = cat.con.sql(sql).to_arrow_reader(batch_rows)
    for batch in reader:
        if batch.num_rows:
            yield batch


def count(cat: Catalog, sql: str) -> int:
    """Rows of ``sql``."""
    return int(run_sql(cat.con, f"SELECT count(*) AS n FROM ({sql})").column("n")[0].as_py())


EXACT_MAX_ROWS = (
    100_000  # an exact search loads the matrix (rows x dim x 4 bytes: 230 MB at 576 dims); above: the index
)


def too_many_for_exact(cat: Catalog, version: str, rows: int) -> UserError:
    """The one refusal of an exact search over more than ``EXACT_MAX_ROWS`` rows of ``version``: build the index."""
    from catalog_tagger.storage import redact

    return UserError(
        f"the {rows:,} rows of model {version} are too many for an exact search (over {EXACT_MAX_ROWS:,}): "
        f"run `catalog-tagger index --output {redact(cat.output)}` first"
    )


def live_count(cat: Catalog, version: str) -> int:
    """Rows of ``latest`` tagged by ``version``."""
    found = run_sql(cat.con, "SELECT count(*) AS n FROM latest WHERE model_version = ?", [version])
    return int(found.column("n")[0].as_py())


def latest_rows(cat: Catalog, version: str, columns: list[str]) -> pa.Table:
    """``uri``, ``embedding`` and ``columns`` (of ``latest``) of every ``latest`` row of model ``version``, in one
    table (rows x dim x 4 bytes: for small outputs; ``batches`` streams). The embedding is the one of the same row
    in the history (same uri and run); a run that wrote a uri twice counts its newest row."""
    cols = ", ".join(["l.uri", "p.embedding", *(f"l.{sql_ident(t)}" for t in columns)])
    return run_sql(
        cat.con,
        f"""
        SELECT {cols} FROM latest AS l JOIN predictions AS p ON p.uri = l.uri AND p.run_id = l.run_id
        WHERE {_latest_runs(cat, version)}
          AND p.model_version = ? AND p.status = {sql_string(STATUS_OK)} AND l.model_version = ?
        QUALIFY row_number() OVER (PARTITION BY l.uri ORDER BY p.tagged_at DESC) = 1
        ORDER BY l.uri
        """,
        [version, version],
    )


def labels_of(cat: Catalog, uris: list[str], columns: list[str]) -> dict[str, dict[str, Any]]:
    """``columns`` of the ``latest`` rows of ``uris``, by uri (a uri without a row is absent)."""
    cols = ", ".join(["uri", *(sql_ident(t) for t in columns)])
    found = run_sql(cat.con, f"SELECT {cols} FROM latest WHERE uri IN (SELECT unnest(?))", [uris])
    return {r["uri"]: r for r in found.to_pylist()}
