"""`python -m bench.latest_merge [--rows N]`: what keeping ``OUT/latest`` costs each night, MERGE vs rebuild.

A synthetic ``predictions`` history of N rows (one run; an 8-float embedding; the demo's tasks), merged into
``latest`` once (the first night), then a run re-tagging 1% of the images. The nightly cost of the two ways:

- MERGE (what ``latest.merge_run`` does): only the new run's rows are read; delta-rs MERGE is copy-on-write, so
  every ``latest`` file holding a changed image is rewritten.
- rebuild: a DuckDB window query over the whole history (one row per uri, newest ``tagged_at``) written with
  ``write_deltalake(mode="overwrite")``, as a CREATE OR REPLACE would.

Prints seconds, bytes written and the table's files for both, and their ratios.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import deltalake  # before pyarrow.dataset (see the rules on import order)
import numpy as np
import pyarrow as pa

from catalog_tagger.config import TaskConfig
from catalog_tagger.tag import delta, latest

DIM = 8
TASKS = TaskConfig.model_validate(
    {
        "tasks": [
            {"name": "category", "kind": "multiclass", "labels": ["dress", "shirt", "shoe", "bag", "hat"]},
            {"name": "color", "kind": "multiclass", "labels": ["red", "green", "blue", "black", "white"]},
            {"name": "style", "kind": "multilabel", "labels": ["plain", "striped", "dotted", "logo"]},
        ]
    }
)


def _rows(idx: np.ndarray, run_id: str, when: datetime, seed: int) -> pa.Table:
    """Rows of the history schema for images ``idx`` (vectorised: 10^6 rows in about a second)."""
    rng = np.random.default_rng(seed)
    n = len(idx)
    schema = delta.predictions_schema(TASKS, DIM)
    labels = {t.name: np.array(t.labels) for t in TASKS.tasks}
    uris = pa.array(np.char.add(np.char.add("s3://catalog/images/", idx.astype(str)), ".jpg"))
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * DIM)
    style_offsets = pa.array(np.arange(n + 1, dtype=np.int32) * 4)
    data: dict[str, Any] = {
        "uri": uris,
        "size": pa.array(rng.integers(10_000, 500_000, n)),
        "etag": uris,
        "mtime": pa.array(np.full(n, np.datetime64(when.replace(tzinfo=None), "us"))),
        "content_hash": uris,
        "run_id": pa.array([run_id] * n),
        "model_version": pa.array(["bench-model"] * n),
        "status": pa.array(["ok"] * n),
        "error": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, 640, np.int32)),
        "height": pa.array(np.full(n, 480, np.int32)),
        "category": pa.array(labels["category"][rng.integers(0, 5, n)]),
        "category_score": pa.array(rng.random(n, np.float32)),
        "color": pa.array(labels["color"][rng.integers(0, 5, n)]),
        "color_score": pa.array(rng.random(n, np.float32)),
        "style": pa.array([["plain"]] * n),
        "style_scores": pa.ListArray.from_arrays(style_offsets, pa.array(rng.random(n * 4, np.float32))),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(rng.random(n * DIM, np.float32))),
        "tagged_at": pa.array(np.full(n, np.datetime64(when.replace(tzinfo=None), "us"))),
        "run_date": pa.array([when.date()] * n, pa.date32()),
    }
    return pa.table({f.name: data[f.name] for f in schema}).cast(schema)


def _commit(uri: str, table: pa.Table) -> None:
    from deltalake import write_deltalake

    write_deltalake(uri, table, mode="append", partition_by=[delta.PARTITION])


def _files(table: deltalake.DeltaTable) -> tuple[int, int]:
    """(data files, bytes) of the table's current version."""
    adds = pa.table(table.get_add_actions(flatten=True))  # type: ignore[call-overload]
    return adds.num_rows, int(pa.compute.sum(adds["size_bytes"]).as_py() or 0)


def _merge(history_uri: str, latest_uri: str, run_id: str) -> dict[str, float]:
    history = deltalake.DeltaTable(history_uri)
    schema = delta.latest_schema(pa.schema(history.schema().to_arrow()))  # type: ignore[call-overload]
    target = delta.ensure_table(latest_uri, schema, None)
    start = time.perf_counter()
    latest.merge_run(history, target, run_id)
    seconds = time.perf_counter() - start
    target.update_incremental()
    metrics = target.history(1)[0].get("operationMetrics", {})
    files, size = _files(target)
    return {
        "seconds": seconds,
        "files_rewritten": float(metrics.get("num_target_files_added", 0)),
        "rows_copied": float(metrics.get("num_target_rows_copied", 0)),
        "files": files,
        "bytes": size,
    }


def _rebuild(history_uri: str, latest_uri: str) -> dict[str, float]:
    """One row per uri (newest tagged_at) over the whole history, written over the table."""
    import duckdb
    from deltalake import write_deltalake

    start = time.perf_counter()
    history = deltalake.DeltaTable(history_uri)
    columns = delta.latest_schema(pa.schema(history.schema().to_arrow())).names  # type: ignore[call-overload]
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.register("predictions", delta.dataset(history))
    cols = ", ".join(columns)
    reader = con.sql(
        f"SELECT {cols} FROM predictions WHERE status = 'ok' OR starts_with(error, 'decode:') "
        "QUALIFY row_number() OVER (PARTITION BY uri ORDER BY tagged_at DESC) = 1"
    ).to_arrow_reader()
    write_deltalake(latest_uri, reader, mode="overwrite", schema_mode="overwrite")
    seconds = time.perf_counter() - start
    files, size = _files(deltalake.DeltaTable(latest_uri))
    return {"seconds": seconds, "files_rewritten": float(files), "rows_copied": 0.0, "files": files, "bytes": size}


def run(rows: int, changed: float, workdir: Path) -> dict[str, dict[str, float]]:
    """Build the history, merge night 1, then time night 2 (``changed`` of the images re-tagged) both ways."""
    history_uri, merged_uri, rebuilt_uri = (str(workdir / n) for n in ("predictions", "latest", "latest_rebuilt"))
    day1 = datetime(2024, 5, 1, 2, tzinfo=UTC)
    for start in range(0, rows, 250_000):  # in slices: the bench process stays small
        _commit(history_uri, _rows(np.arange(start, min(rows, start + 250_000)), "night1", day1, start))
    first = _merge(history_uri, merged_uri, "night1")
    _rebuild(history_uri, rebuilt_uri)
    rng = np.random.default_rng(7)
    picked = np.sort(rng.choice(rows, size=max(1, int(rows * changed)), replace=False))
    _commit(history_uri, _rows(picked, "night2", day1 + timedelta(days=1), 99))
    return {
        "first merge (night 1)": first,
        "MERGE (night 2)": _merge(history_uri, merged_uri, "night2"),
        "rebuild (night 2)": _rebuild(history_uri, rebuilt_uri),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.latest_merge", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="images in the history (default 10^6)")
    p.add_argument("--changed", type=float, default=0.01, help="share of images the second night re-tags")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-latest-"))
    try:
        out = run(args.rows, args.changed, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [f"latest maintenance, {args.rows:,} images, {args.changed:.1%} re-tagged on night 2"]
    head = ("seconds", "files written", "rows copied", "latest files", "latest MiB")
    lines.append(f"{'':24} {head[0]:>9} {head[1]:>14} {head[2]:>12} {head[3]:>13} {head[4]:>11}")
    for name, m in out.items():
        lines.append(
            f"{name:24} {m['seconds']:9.2f} {m['files_rewritten']:14.0f} {m['rows_copied']:12,.0f} "
            f"{m['files']:13.0f} {m['bytes'] / 2**20:11.1f}"
        )
    merge, rebuild = out["MERGE (night 2)"], out["rebuild (night 2)"]
    lines.append(
        f"rebuild / MERGE: {rebuild['seconds'] / merge['seconds']:.2f}x the time, "
        f"{rebuild['bytes'] / max(1, merge['bytes']):.2f}x the table size"
    )
    print("\n".join(lines))  # noqa: T201 - a bench script's output is its report


if __name__ == "__main__":
    main()
