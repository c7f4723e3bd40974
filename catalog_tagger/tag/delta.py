"""The output's Delta Lake tables (delta-rs): where they live, their schemas, the one commit per run, and the
committed state read back through the log.

``OUT/predictions`` is the append-only history (one row per image per run, partitioned by ``run_date``). Workers
write its Parquet data files; the driver adds them in ONE commit per run that carries the run id twice: as a Delta
application transaction (``catalog-tagger/run/<id>``, so "is this run committed?" is one lookup in the snapshot)
and in the commit's metadata with the run's manifest (the record ``runs/<id>.json`` is rebuilt from). A file no
commit names is invisible to every reader that goes through the log, and ``maintain`` vacuums it.
``OUT/latest`` (one current row per image, no embedding) is derived from the history after each commit
(``latest.py``); it records the runs merged into it the same way.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from catalog_tagger.errors import UserError
from catalog_tagger.schema import OUTPUT_SCHEMA_VERSION, output_schema
from catalog_tagger.storage import create_exclusive, filesystem, is_local, join, protocol_of, redact, strip

if TYPE_CHECKING:
    import pyarrow.dataset as pads
    from deltalake import DeltaTable
    from deltalake.transaction import AddAction, RemoveAction

    from catalog_tagger.config import TaskConfig

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
LATEST = "latest"
PARTITION = "run_date"
RUN_APP = "catalog-tagger/run/"  # application transaction id of a run's commit to predictions
LATEST_APP = "catalog-tagger/latest/"  # ... of the merge of a run into latest
RUN_KEY = "catalog_tagger.run"  # commit metadata: the run's manifest, as JSON
RUN_ID_KEY = "catalog_tagger.run_id"
DESCRIPTION = f"catalog-tagger output schema v{OUTPUT_SCHEMA_VERSION}"
# The log carries every run's manifest and id: keep its entries (one or a few per night) for ten years instead of
# Delta's default 30 days, after which checkpoints may delete them.
TABLE_PROPERTIES = {"delta.logRetentionDuration": "interval 3650 days"}
EMBEDDING = "embedding"


# --------------------------------------------------------------------------------------------- where and how
def table_uri(output: str, name: str) -> str:
    """The URI of one of the output's tables, in the form delta-rs takes (absolute path for local outputs)."""
    return strip(join(output, name)) if is_local(output) else join(output, name)


def delta_options(output: str, storage_options: dict[str, Any] | None) -> dict[str, str] | None:
    """fsspec/s3fs storage options -> delta-rs (object_store) options; ``None`` for local outputs.

    Keys delta-rs does not get here (such as ``AWS_ENDPOINT_URL``) it reads from the environment, like botocore.
    """
    if is_local(output):
        return None
    opts = dict(storage_options or {})
    client = dict(opts.get("client_kwargs") or {})
    out: dict[str, str] = {}
    mapping = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
    for key, name in mapping.items():
        if opts.get(key):
            out[name] = str(opts[key])
    endpoint = opts.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        out["AWS_ENDPOINT_URL"] = str(endpoint)
    if str(endpoint or os.environ.get("AWS_ENDPOINT_URL", "")).startswith("http://"):
        out["AWS_ALLOW_HTTP"] = "true"  # a plain-HTTP endpoint (MinIO, a test server) given here or in the env
    region = client.get("region_name") or opts.get("region_name")
    if region:
        out["AWS_REGION"] = str(region)
    if opts.get("anon"):
        out["AWS_SKIP_SIGNATURE"] = "true"
    if protocol_of(output) in ("s3", "s3a"):
        out.setdefault("AWS_REGION", "us-east-1")
    return out


def predictions_schema(tasks: TaskConfig, embedding_dim: int) -> pa.Schema:
    """Output schema v2: the row columns, the embedding as ``list<float32>`` (Delta has no fixed-size list; every
    row holds ``embedding_dim`` values), and the ``run_date`` partition column."""
    base = output_schema(tasks, embedding_dim)
    fields = [
        pa.field(EMBEDDING, pa.list_(pa.field("element", pa.float32()))) if f.name == EMBEDDING else f for f in base
    ]
    return pa.schema([*fields, pa.field(PARTITION, pa.date32())], metadata=base.metadata)


def latest_schema(predictions: pa.Schema) -> pa.Schema:
    """``latest``: the history's columns without the embedding and the partition."""
    return pa.schema([f for f in predictions if f.name not in (EMBEDDING, PARTITION)])


def file_schema(predictions: pa.Schema) -> pa.Schema:
    """The columns of a data file: partition values live in the path and the log, not in the file."""
    return pa.schema([f for f in predictions if f.name != PARTITION], metadata=predictions.metadata)


def require_conditional_put(output: str, storage_options: dict[str, Any] | None) -> None:
    """Refuse an S3 output whose store ignores ``If-None-Match`` (conditional PUT): delta-rs commits by creating
    the next log entry only if it does not exist, so on such a store two commits could overwrite each other.
    Checked once, when the output's first table is created; skipped when a DynamoDB lock is configured."""
    if protocol_of(output) not in ("s3", "s3a"):
        return
    opts = delta_options(output, storage_options) or {}
    if opts.get("AWS_S3_LOCKING_PROVIDER") or os.environ.get("AWS_S3_LOCKING_PROVIDER"):
        return
    probe = join(output, "_locks", f".conditional-put-probe-{uuid.uuid4().hex}")
    first = create_exclusive(probe, b"1", storage_options)
    second = create_exclusive(probe, b"2", storage_options)
    with suppress(FileNotFoundError):
        filesystem(output, storage_options).rm(strip(probe))
    if first and not second:
        return
    raise UserError(
        f"output {redact(output)}: the store does not honour conditional PUT (If-None-Match), which Delta commits "
        "rely on; use a store that does (AWS S3, MinIO, Cloudflare R2, ...) or configure delta-rs's DynamoDB lock "
        "(AWS_S3_LOCKING_PROVIDER=dynamodb and DELTA_DYNAMO_TABLE_NAME; see docs/reliability.md)"
    )


# --------------------------------------------------------------------------------------------- opening
def open_table(uri: str, options: dict[str, str] | None) -> DeltaTable | None:
    """The Delta table at ``uri``, or None when there is none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, storage_options=options)
    except TableNotFoundError:
        return None


def ensure_table(
    uri: str, schema: pa.Schema, options: dict[str, str] | None, *, partition_by: list[str] | None = None
) -> DeltaTable:
    """Open the table, creating it (empty, version 0) when missing; two runs creating it at once both get it."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    table = open_table(uri, options)
    if table is not None:
        return table
    try:
        return DeltaTable.create(
            uri,
            schema,
            mode="ignore",
            partition_by=partition_by,
            description=DESCRIPTION,
            configuration=dict(TABLE_PROPERTIES),
            storage_options=options,
        )
    except DeltaError:  # lost the race to create it
        table = open_table(uri, options)
        if table is None:
            raise
        return table


def refuse_task_change(table: DeltaTable, schema: pa.Schema, *, allow: bool, what: str) -> pa.Schema:
    """The schema to commit with. A model whose output columns differ from the table's is refused, naming the
    difference, unless ``allow``: then the table's schema gains the new columns, and the columns the model lacks
    stay (NULL in the new rows, which the docs state); a column whose type changed is always refused."""
    current = pa.schema(table.schema().to_arrow())
    have, want = set(current.names), set(schema.names)
    changed = [n for n in have & want if not _same_type(current.field(n).type, schema.field(n).type)]
    if changed:
        raise UserError(
            f"{what}: the model's column(s) {', '.join(sorted(changed))} have another type than in the table; "
            "write to another output"
        )
    added, missing = sorted(want - have), sorted(have - want)
    if not added and not missing:
        return current
    if not allow:
        raise UserError(
            f"{what}: the model's tasks differ from the table's (new columns: {', '.join(added) or 'none'}; "
            f"columns the model does not produce: {', '.join(missing) or 'none'}); pass --allow-task-change to "
            "add the new columns (rows of this model then hold NULL in the columns it lacks), or use another output"
        )
    return pa.schema([*current, *(schema.field(n) for n in schema.names if n in added)])


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Types equal up to list field names and nullability (delta-rs names list items ``element``)."""
    if pa.types.is_list(a) and pa.types.is_list(b):
        return _same_type(a.value_type, b.value_type)
    a = pa.string() if pa.types.is_large_string(a) else a
    b = pa.string() if pa.types.is_large_string(b) else b
    return bool(a.equals(b))


# --------------------------------------------------------------------------------------------- runs in the log
def run_app_id(run_id: str) -> str:
    return RUN_APP + run_id


def has_run(table: DeltaTable, run_id: str) -> bool:
    """Whether ``run_id`` has a commit in ``table`` (its application transaction is in the snapshot)."""
    return table.transaction_version(run_app_id(run_id)) is not None


@dataclass(frozen=True)
class CommittedRun:
    """One run's commit, read from the Delta log."""

    version: int
    run_id: str
    manifest: dict[str, Any]


def runs_after(table: DeltaTable, version: int) -> list[CommittedRun]:
    """Runs committed after table ``version`` (oldest first): only the commits since then are read."""
    newer = table.version() - version
    if newer <= 0:
        return []
    return sorted(_runs(table.history(limit=newer)), key=lambda r: r.version)


def all_runs(table: DeltaTable) -> list[CommittedRun]:
    """Every run whose commit is still in the log (oldest first)."""
    return sorted(_runs(table.history()), key=lambda r: r.version)


def _runs(history: list[dict[str, Any]]) -> Iterator[CommittedRun]:
    for entry in history:
        run_id, text = entry.get(RUN_ID_KEY), entry.get(RUN_KEY)
        if run_id and text:
            try:
                manifest = json.loads(text)
            except json.JSONDecodeError:
                log.warning("commit %s of run %s carries an unreadable manifest", entry.get("version"), run_id)
                continue
            yield CommittedRun(version=int(entry["version"]), run_id=str(run_id), manifest=manifest)


def find_run(table: DeltaTable, run_id: str) -> CommittedRun | None:
    """The commit of ``run_id`` (None when it has none)."""
    if not has_run(table, run_id):
        return None
    return next((r for r in all_runs(table) if r.run_id == run_id), None)


def commit_run(
    table: DeltaTable, run_id: str, files: list[AddAction | RemoveAction], schema: pa.Schema, manifest: dict[str, Any]
) -> int:
    """Add ``files`` to the table in ONE commit carrying the run id and its manifest; returns the new version.

    Call it holding the output's commit lock and after checking ``has_run``: delta-rs itself lets a
    second, sequential commit of the same application transaction through.
    """
    from deltalake import CommitProperties, Transaction

    props = CommitProperties(
        custom_metadata={RUN_ID_KEY: run_id, RUN_KEY: json.dumps(manifest, sort_keys=True, default=str)},
        app_transactions=[Transaction(run_app_id(run_id), 1)],
    )
    table.create_write_transaction(files, "append", schema, partition_by=[PARTITION], commit_properties=props)
    table.update_incremental()
    version = table.version()
    log.info("committed run %s: %d file(s), table version %d", run_id, len(files), version)
    return version


# --------------------------------------------------------------------------------------------- reading
def data_files(table: DeltaTable) -> list[str]:
    """Paths (relative to the table) of the data files the current snapshot holds."""
    actions = pa.table(table.get_add_actions(flatten=True))
    return sorted(actions.column("path").to_pylist())


def dataset(table: DeltaTable) -> pads.Dataset:
    """The table's committed files as a pyarrow dataset (read through the log: never a glob of the folder)."""
    return table.to_pyarrow_dataset()
