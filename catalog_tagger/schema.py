"""The output contract: one Parquet row per input image per run. Versioned; pinned by a golden test."""

from __future__ import annotations

import pyarrow as pa

from catalog_tagger.config import TaskConfig
from catalog_tagger.kinds import kind_of

# Bump on any change to the columns below, and say what changed in README "Output schema".
OUTPUT_SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_ERROR = "error"

_TS = pa.timestamp("us", tz="UTC")

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("uri", pa.string(), nullable=False),  # the image's URI as listed (absolute local path or scheme://...)
    pa.field("size", pa.int64()),  # bytes, from the store's listing
    pa.field("etag", pa.string()),  # object-store ETag when the store gives one
    pa.field("mtime", _TS),  # last-modified time from the store, when it gives one
    pa.field("content_hash", pa.string()),  # blake2b-128 of the bytes read (null when unreadable)
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
    pa.field("error", pa.string()),  # reason, for status = "error"
    pa.field("width", pa.int32()),  # original width as displayed (EXIF orientation applied)
    pa.field("height", pa.int32()),
)


def task_fields(tasks: TaskConfig) -> list[pa.Field]:
    """Every task's output columns, in task order (each kind says which)."""
    return [f for t in tasks.tasks for f in kind_of(t).fields(t)]


def output_schema(tasks: TaskConfig, embedding_dim: int) -> pa.Schema:
    fields = [
        *BASE_FIELDS,
        *task_fields(tasks),
        pa.field("embedding", pa.list_(pa.float32(), embedding_dim)),  # shared backbone embedding (not normalised)
        pa.field("tagged_at", _TS, nullable=False),
    ]
    meta = {
        b"catalog_tagger.schema_version": str(OUTPUT_SCHEMA_VERSION).encode(),
        b"catalog_tagger.tasks": tasks.model_dump_json().encode(),
    }
    return pa.schema(fields, metadata=meta)
