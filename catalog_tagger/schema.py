"""The data contracts: output rows, listing and work tables, statuses, and the run manifest. Golden-tested."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from catalog_tagger.config import TaskConfig
from catalog_tagger.kinds import kind_of

# Bump on any change to the columns below, and say what changed in README "Output schema".
OUTPUT_SCHEMA_VERSION = 2  # 2: Delta Lake tables; embedding list<float32>; run_date partition
# Bump on any change to the run manifest's keys (``RunManifest``). 2: counts.skipped_by_reason. 3: the Delta
# commit lists the files: ``files``/``bytes`` are their count and size.
# 4: savings with ranges, busy and allocated views, calibration record; start-up timings.
MANIFEST_VERSION = 5  # 5: ``profile`` (label distributions, confidence) and ``health`` (error budget, drift)

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_UNCHANGED = "unchanged"  # internal: same bytes as the last committed row; never written

# Internal columns of the work in flight: per-row seconds the sink sums for the run's accounting, then drops.
ACCEL_COL = "_accel_s"  # share of the batch's multi-head forward time
DECODE_COL = "_decode_s"  # CPU seconds of read + decode

_TS = pa.timestamp("us", tz="UTC")

# --------------------------------------------------------------------------------------------- output rows
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


# --------------------------------------------------------------------------------------------- listing and work
LISTING_SCHEMA = pa.schema(  # the images a run considers: unique uris, sorted
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),
        pa.field("mtime", _TS),
    ]
)
# What identifies an image's bytes between runs (the diff and the check before a commit compare these).
IDENTITY_COLUMNS = ["uri", "size", "etag", "mtime", "content_hash"]
WORK_SCHEMA = pa.schema(  # what a run must read: the listing minus what is settled
    [
        *LISTING_SCHEMA,
        pa.field("prev_hash", pa.string()),  # content hash of the last committed row, when identity needs bytes
    ]
)

# --------------------------------------------------------------------------------------------- run manifest
# Field metadata key: the Arrow type of a manifest field that the ``runs`` view (query.py) shows as a column.
RUNS_TYPE = "runs_type"


def runs_column(arrow: pa.DataType) -> dict[str, pa.DataType]:
    """Field metadata: the ``runs`` view shows this manifest field as a column of type ``arrow``."""
    return {RUNS_TYPE: arrow}


_COUNT = runs_column(pa.int64())
# Why an entry under a local prefix was left out (besides files without an image extension, skipped_non_image):
# it is not a regular file, or it is a sub-folder that could not be listed. Symlinks are never followed.
SKIP_REASONS = (
    "unreadable_folder",  # a sub-folder that could not be listed (permission, I/O error): its images are not tagged
    "fifo",
    "socket",
    "device",  # character or block device
    "broken_symlink",
    "symlink_inside",  # its target lies inside the prefix: tagged under its own path, once
    "symlink_outside",  # its target lies outside the prefix: not tagged (list it in a manifest to tag it)
    "other",  # any other kind of entry
)
_SECONDS = runs_column(pa.float64())
_STRING = runs_column(pa.string())


@dataclass
class RunCounts:
    """``counts``: what happened to the listed images. Every count is a column of the ``runs`` view."""

    listed: int = field(metadata=_COUNT)  # images in the listing (after --limit)
    to_tag: int = field(metadata=_COUNT)  # new or changed images, the resumed ones included
    unchanged: int = field(metadata=_COUNT)  # skipped: same identity (or bytes) as the last committed row
    rows: int = field(metadata=_COUNT)  # rows committed: ok + error
    ok: int = field(metadata=_COUNT)
    error: int = field(metadata=_COUNT)
    skipped_non_image: int = field(metadata=_COUNT)  # files under a prefix without an image extension
    duplicate_uris: int = field(metadata=_COUNT)  # repeated uris in a manifest source (each tagged once)
    # entries under a local prefix that are not regular files (or sub-folders not listed), by SKIP_REASONS
    skipped_by_reason: dict[str, int] = field(metadata=runs_column(pa.struct([(r, pa.int64()) for r in SKIP_REASONS])))
    retried_duplicates_dropped: int = field(metadata=_COUNT)  # rows a Ray retry delivered twice
    resumed: int = field(metadata=_COUNT)  # staged by an earlier attempt of this run id, not tagged again
    committed_meanwhile_dropped: int = field(metadata=_COUNT)  # committed first by a concurrent run


@dataclass
class RunTimings:
    """``timings``: where the run's time went. Accelerator and decode seconds include earlier attempts."""

    wall_s: float = field(metadata=_SECONDS)  # driver wall time up to the commit
    list_s: float = field(metadata=_SECONDS)  # listing the source
    pipeline_s: float = field(metadata=_SECONDS)  # read + decode + predict + stage, this attempt
    accel_s: float = field(metadata=_SECONDS)  # summed busy seconds of the multi-head forward passes
    decode_cpu_s: float = field(metadata=_SECONDS)  # summed CPU seconds of read + decode
    images_per_s: float | None = field(metadata=_SECONDS)  # ok rows of this attempt / pipeline_s
    # start-up of this attempt: starting or joining Ray (None: in-process executor), the calibration (reading the
    # stored one, or measuring it), and the pipeline's first result (actors up, model loaded, first batch done)
    ray_init_s: float | None = field(default=None, metadata=_SECONDS)
    calibration_s: float | None = field(default=None, metadata=_SECONDS)
    first_batch_s: float | None = field(default=None, metadata=_SECONDS)


@dataclass
class RunManifest:
    """A run's manifest: carried by its Delta commit (the truth) and copied to ``runs/<run_id>.json``.

    Written as JSON with exactly these keys (pinned by a golden test); readers take it as a plain dict.
    """

    run_id: str = field(metadata=_STRING)
    run_date: str = field(metadata=runs_column(pa.date32()))  # YYYY-MM-DD (UTC) of the first attempt: partition
    started_at: str = field(metadata=runs_column(_TS))  # ISO time of the first attempt
    finished_at: str = field(metadata=runs_column(_TS))  # ISO time with milliseconds: orders same-second runs
    model: str = field(metadata=_STRING)  # the model artifact URI the run was given (absolute when local)
    model_version: str = field(metadata=_STRING)
    source: str = field(metadata=_STRING)  # credentials redacted
    schema_version: int = field(metadata=runs_column(pa.int32()))  # OUTPUT_SCHEMA_VERSION of the rows
    incremental: bool = field(metadata=runs_column(pa.bool_()))  # False for --full runs
    tasks: list[str] = field(metadata=runs_column(pa.list_(pa.string())))  # task names
    counts: RunCounts
    timings: RunTimings
    resources: dict[str, Any]  # the executor's plan: executor, actors, num_gpus, num_cpus, threads, ...
    savings: dict[str, Any]  # accounting.compute_savings(...), plus the calibration record
    notes: list[str]
    files: int = field(default=0, metadata=runs_column(pa.int64()))  # data files the run's Delta commit added
    bytes: int = field(default=0, metadata=runs_column(pa.int64()))  # their total size
    # {"tasks": {task: {kind, rows, labels: {label: count}, mean_confidence, low_confidence_share}}} of the
    # committed rows (tag/profile.py); None in manifests before version 5 and for runs that were not profiled. A
    # regression task adds mean, std, min and max, and its labels are counts per bin of its range (none without one)
    profile: dict[str, Any] | None = None
    # {status: ok|warning|failed, error_fraction, max_error_fraction, warnings: [str], drift: [{task, psi,
    # mean_confidence, previous_mean_confidence, message}]} (tag/health.py); None before manifest version 5
    health: dict[str, Any] | None = None
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (nested dicts and lists)."""
        return asdict(self)
