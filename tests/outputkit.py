"""Hand-built outputs for the maintain and migrate tests: rows in the output schema, a v2 run committed through
the Delta building blocks (``writer.PartWriter`` + ``delta.commit_run``), and a v1 output as the old commit left it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import deltalake  # noqa: F401 - imported before pyarrow.parquet (see the rules on import order)
import pyarrow as pa
import pyarrow.parquet as pq

from catalog_tagger.config import TaskConfig
from catalog_tagger.schema import output_schema
from catalog_tagger.tag import commit, delta, writer

TASKS = TaskConfig.model_validate(
    {
        "tasks": [
            {"name": "color", "kind": "multiclass", "labels": ["red", "blue"]},
            {"name": "style", "kind": "multilabel", "labels": ["plain", "striped"]},
        ]
    }
)
DIM = 4


def rows(uris: list[str], run_id: str, *, color: str = "red", tagged_at: datetime | None = None) -> pa.Table:
    """Ok rows in ``schema.output_schema`` (fixed-size embedding), one per uri."""
    when = tagged_at or datetime.now(UTC)
    n = len(uris)
    data: dict[str, Any] = {
        "uri": uris,
        "size": [100 + i for i in range(n)],
        "etag": [f"e{i}" for i in range(n)],
        "mtime": [when] * n,
        "content_hash": [f"h{i}" for i in range(n)],
        "run_id": [run_id] * n,
        "model_version": ["m1"] * n,
        "status": ["ok"] * n,
        "error": [None] * n,
        "width": [32] * n,
        "height": [32] * n,
        "color": [color] * n,
        "color_score": [0.9] * n,
        "style": [["plain"]] * n,
        "style_scores": [[0.8, 0.1]] * n,
        "embedding": [[float(i)] * DIM for i in range(n)],
        "tagged_at": [when] * n,
    }
    return pa.Table.from_pydict(data, schema=output_schema(TASKS, DIM))


def manifest(run_id: str, run_date: str, n: int, *, finished_at: str | None = None) -> dict[str, Any]:
    """A run manifest with the keys readers use (the v1 one adds ``files``)."""
    when = finished_at or datetime.now(UTC).isoformat(timespec="milliseconds")
    return {
        "run_id": run_id,
        "run_date": run_date,
        "started_at": when,
        "finished_at": when,
        "model": "/models/m1",
        "model_version": "m1",
        "source": "/catalog",
        "schema_version": 1,
        "incremental": True,
        "tasks": ["color", "style"],
        "counts": {"rows": n, "ok": n, "error": 0},
        "timings": {},
        "resources": {},
        "savings": {},
        "notes": [],
        "manifest_version": 2,
    }


def commit_v2_run(
    output: str, run_id: str, table: pa.Table, *, run_date: str = "2024-05-01", storage_options: dict | None = None
) -> int:
    """Write ``table`` as one data file of ``OUT/predictions`` and commit it as run ``run_id``; returns the
    version. Leaves the run's staging sidecar, as a run killed after its commit would."""
    schema = delta.predictions_schema(TASKS, DIM)
    opts = delta.delta_options(output, storage_options)
    history = delta.ensure_table(delta.table_uri(output, delta.PREDICTIONS), schema, opts, partition_by=["run_date"])
    staged = stage_v2_file(output, run_id, table, run_date=run_date, storage_options=storage_options)
    add = commit.add_action(staged)
    return delta.commit_run(history, run_id, [add], schema, manifest(run_id, run_date, table.num_rows))


def stage_v2_file(
    output: str, run_id: str, table: pa.Table, *, run_date: str = "2024-05-01", storage_options: dict | None = None
) -> writer.StagedFile:
    """A data file + sidecar of a run, not committed (a run in flight, or one that crashed)."""
    file_schema = delta.file_schema(delta.predictions_schema(TASKS, DIM))
    timing = {col: pa.array([0.0] * table.num_rows) for col in writer.TIMING_COLS.values()}
    for col, values in timing.items():
        table = table.append_column(col, values)
    return writer.PartWriter(output, run_id, run_date, storage_options, file_schema).write(table)


def write_v1_run(out: Path, run_id: str, parts: list[pa.Table], *, run_date: str, finished_at: str) -> None:
    """A run as the v1 commit left it: ``predictions/run_date=D/run_id=R/part-NNNNN.parquet`` + ``runs/R.json``
    (schema_version 1, a ``files`` list with paths relative to OUT)."""
    folder = out / "predictions" / f"run_date={run_date}" / f"run_id={run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, part in enumerate(parts):
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(part, path, compression="zstd")
        files.append(
            {
                "path": str(path.relative_to(out)),
                "rows": part.num_rows,
                "ok": part.num_rows,
                "error": 0,
                "bytes": path.stat().st_size,
            }
        )
    doc = manifest(run_id, run_date, sum(p.num_rows for p in parts), finished_at=finished_at)
    (out / "runs").mkdir(exist_ok=True)
    (out / "runs" / f"{run_id}.json").write_text(json.dumps({**doc, "files": files}, indent=2))
