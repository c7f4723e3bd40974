"""The files a training run writes beside the model artifact: their names, their formats, and how they are written."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from catalog_tagger.storage import join, write_bytes_atomic

SPLIT_FILE = "split.parquet"  # uri -> train / val / test
METRICS_FILE = "metrics.csv"  # one row per epoch, rewritten after each
REPORT_FILE = "training_report.json"  # counts, skipped images, test metrics, timings, the config
COMPARISON_FILE = "comparison.json"  # --single-task: multi-head vs one model per task
SINGLE_TASK_DIR = "single_task"  # --single-task: one artifact per task under it
METRICS_LEAD = ("epoch", "lr", "seconds", "train_loss", "val_loss")


def write_file(out: str, name: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    """Write ``out/name`` whole or not at all (a reader never sees half a metrics.csv)."""
    write_bytes_atomic(join(out, name), data, storage_options)


def write_json(out: str, name: str, value: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    write_file(out, name, json.dumps(value, indent=2).encode(), storage_options)


def metrics_csv(history: list[dict[str, Any]]) -> bytes:
    """The per-epoch log: fixed leading columns, then every per-task val column in first-seen order."""
    cols = list(METRICS_LEAD)
    for row in history:
        cols.extend(k for k in row if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue().encode()


def split_parquet(uris: Sequence[str], names: Sequence[str]) -> bytes:
    """split.parquet: each image's uri and the split it was in."""
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": pa.array(uris, pa.string()), "split": pa.array(names, pa.string())}), buf)
    return bytes(buf.getvalue().to_pybytes())
