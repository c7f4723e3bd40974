"""The output layout's version, the refusal of an old (v1) output, and ``catalog-tagger migrate`` from v1 to v2.

v1 (before Delta): part files under ``predictions/run_date=D/run_id=R/``, a run committed iff ``runs/R.json`` (with
a ``files`` list) exists. v2: the ``predictions`` and ``latest`` Delta tables (``delta.py``). The two are never
mixed: a run, ``maintain`` and the readers refuse a v1 output, naming the command that converts it.

``migrate`` commits each v1 run to ``predictions`` as the v2 commit of that run would (ONE commit per run, same run
id, its manifest in the commit, data files rewritten with the embedding as ``list<float32>``), oldest first, then
merges them into ``latest``. Nothing is deleted: the v1 part files, the v1 manifests and any v1 staging move to
``OUT/_v1_backup/`` (delete it once satisfied), and ``runs/R.json`` is rewritten as the v2 derived copy. A marker
(``OUT/_migrating.json``) marks the output v1 until the end, so a crash leaves an output every command refuses
and a rerun of ``migrate`` finishes it (runs already committed are skipped).
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from catalog_tagger.errors import UserError
from catalog_tagger.schema import MANIFEST_VERSION, OUTPUT_SCHEMA_VERSION
from catalog_tagger.storage import filesystem, join, redact, retry_transient, strip
from catalog_tagger.tag import delta, latest, lock, writer
from catalog_tagger.tag.commit import Layout, add_action, write_json, write_manifest_copy

if TYPE_CHECKING:
    from deltalake import DeltaTable
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
BACKUP_DIR = "_v1_backup"
MARKER = "_migrating.json"  # present while a migration is unfinished: the output still counts as v1
LOCK_OWNER = "migrate"


@dataclass
class MigrateReport:
    """The outcome of ``migrate``."""

    output: str
    runs_migrated: list[str] = field(default_factory=list)  # committed to predictions by this call
    runs_already: list[str] = field(default_factory=list)  # committed by an earlier (interrupted) call
    rows: int = 0  # rows committed by this call
    v1_folders_moved: int = 0  # folders moved into the backup
    backup: str | None = None  # where the v1 files are now
    was_v2: bool = False  # nothing to do: the output was already v2


# --------------------------------------------------------------------------------------------- detection
def layout_version(output: str, storage_options: dict[str, Any] | None) -> Literal[1, 2] | None:
    """1 (the old layout, or a migration not finished), 2 (Delta), or None (an empty or new output).

    A few existence checks and listings, never a scan: cheap enough to ask before every command.
    """
    fs = filesystem(output, storage_options)
    if _exists(fs, join(output, MARKER)):
        return 1
    if delta.open_table(delta.table_uri(output, delta.PREDICTIONS), delta.delta_options(output, storage_options)):
        return 2
    if _v1_run_folders(fs, output, first_only=True) or _manifest_paths(fs, output):
        return 1  # v1 part folders, or run manifests without a Delta table (v2 writes them after the commit)
    return None


def refuse_old_layout(output: str, storage_options: dict[str, Any] | None) -> None:
    """Raise ``UserError`` when ``output`` is in the v1 layout: call it before any work on an output."""
    if layout_version(output, storage_options) == 1:
        shown = redact(output)
        raise UserError(
            f"output {shown} is in the v1 layout (part files under predictions/run_date=*/run_id=*, run manifests "
            f"with file lists, or an unfinished migration); run `catalog-tagger migrate --output {shown}` to "
            "convert it"
        )


def _exists(fs: AbstractFileSystem, uri: str) -> bool:
    path = strip(uri)
    fs.invalidate_cache(posixpath.dirname(path))
    return bool(retry_transient(lambda: fs.exists(path), f"stat {path}"))


def _dirs(fs: AbstractFileSystem, uri: str, prefix: str) -> list[str]:
    """Sub-folders of ``uri`` whose name starts with ``prefix`` (paths without scheme), sorted."""
    path = strip(uri)
    fs.invalidate_cache(path)
    try:
        entries = retry_transient(lambda: fs.ls(path, detail=True), f"list {path}")
    except FileNotFoundError:
        return []
    names = [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]
    return sorted(n for n in names if posixpath.basename(n).startswith(prefix))


def _v1_run_folders(fs: AbstractFileSystem, output: str, *, first_only: bool = False) -> list[str]:
    """``predictions/run_date=D/run_id=R`` folders (v2 puts data files straight into ``run_date=D``)."""
    found: list[str] = []
    for day in _dirs(fs, join(output, delta.PREDICTIONS), f"{delta.PARTITION}="):
        found.extend(_dirs(fs, day, "run_id="))
        if found and first_only:
            break
    return found


def _manifest_paths(fs: AbstractFileSystem, output: str) -> list[str]:
    path = strip(join(output, RUNS_DIR))
    fs.invalidate_cache(path)
    try:
        names = retry_transient(lambda: fs.ls(path, detail=False), f"list {path}")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json") and not posixpath.basename(n).startswith((".", "_")))


# --------------------------------------------------------------------------------------------- migration
def migrate(output: str, storage_options: dict[str, Any] | None) -> MigrateReport:
    """Convert a v1 output to v2 in place (see the module docstring); idempotent, and resumable after a crash."""
    report = MigrateReport(output=redact(output))
    version = layout_version(output, storage_options)
    if version == 2:
        log.info("%s is already in the v2 (Delta) layout: nothing to migrate", report.output)
        report.was_v2 = True
        return report
    if version is None:
        raise UserError(f"output {report.output} holds no runs: nothing to migrate")
    fs = filesystem(output, storage_options)
    report.backup = redact(join(output, BACKUP_DIR))
    with lock.commit_lock(Layout(output, storage_options), LOCK_OWNER) as held:
        write_json(join(output, MARKER), {"started_at": _now()}, storage_options)
        _move_aside(fs, output, writer.STAGING_DIR)  # v1 staging cannot resume in v2: keep it in the backup
        manifests = _v1_manifests(fs, output)
        if manifests:  # none left: an earlier attempt got past its last run
            table = _history(output, storage_options, [doc for _, doc in manifests])
            for path, doc in manifests:
                held.refresh()
                manifest = _migrate_run(output, storage_options, table, doc, report)
                _backup_and_rewrite(Layout(output, storage_options), path, doc, manifest)
        held.refresh()
        merged = latest.catch_up(output, storage_options, runs=None)
        log.info("latest: merged %d run(s)", len(merged))
        for folder in _v1_run_folders(fs, output):
            _move_aside(fs, output, posixpath.relpath(folder, strip(output)))
            report.v1_folders_moved += 1
        retry_transient(lambda: fs.rm(strip(join(output, MARKER))), "remove the migration marker")
    log.info(
        "migrated %s: %d run(s) committed (%d already), %d row(s); v1 files kept under %s",
        report.output,
        len(report.runs_migrated),
        len(report.runs_already),
        report.rows,
        report.backup,
    )
    return report


def _v1_manifests(fs: AbstractFileSystem, output: str) -> list[tuple[str, dict[str, Any]]]:
    """The v1 run manifests (those with a ``files`` list), oldest first by finish time."""
    out = []
    for path in _manifest_paths(fs, output):
        try:
            doc = json.loads(retry_transient(partial(fs.cat_file, path), f"read {path}"))
        except json.JSONDecodeError as err:
            raise UserError(f"run manifest {redact(path)} is not valid JSON ({err}); fix or remove it") from None
        if isinstance(doc.get("files"), list):
            out.append((path, doc))
    out.sort(key=lambda item: (str(item[1].get("finished_at", "")), str(item[1].get("run_id", ""))))
    return out


def _history(output: str, storage_options: dict[str, Any] | None, manifests: list[dict[str, Any]]) -> DeltaTable:
    """The v2 ``predictions`` table, created with the columns of the first v1 part file when missing."""
    uri, opts = delta.table_uri(output, delta.PREDICTIONS), delta.delta_options(output, storage_options)
    table = delta.open_table(uri, opts)
    if table is not None:
        return table
    first = next((f["path"] for doc in manifests for f in doc["files"]), None)
    if first is None:
        raise UserError(
            f"output {redact(output)}: its v1 runs committed no rows, so there is nothing to convert; move "
            f"{RUNS_DIR}/ away and tag afresh"
        )
    schema = _v2_schema(_read_v1_schema(filesystem(output, storage_options), join(output, *first.split("/"))))
    return delta.ensure_table(uri, schema, opts, partition_by=[delta.PARTITION])


def _migrate_run(
    output: str, storage_options: dict[str, Any] | None, table: DeltaTable, doc: dict[str, Any], report: MigrateReport
) -> dict[str, Any]:
    """ONE commit to ``predictions`` with this v1 run's rows (skipped when an earlier attempt committed it);
    returns the manifest the commit carries. Part files are converted one at a time: the process never holds more
    than one part."""
    run_id, run_date = str(doc["run_id"]), str(doc["run_date"])
    found = delta.find_run(table, run_id)
    if found is not None:
        report.runs_already.append(run_id)
        return found.manifest
    fs = filesystem(output, storage_options)
    uris = [join(output, *f["path"].split("/")) for f in doc["files"]]
    schema = _v2_schema(_read_v1_schema(fs, uris[0])) if uris else _table_schema(table)
    commit_schema = delta.refuse_task_change(table, schema, allow=True, what=f"run {run_id}")
    staged = [_rewrite(output, storage_options, run_id, run_date, _read_v1_part(fs, uri)) for uri in uris]
    manifest = v2_manifest(doc, files=len(staged), size=sum(f.bytes for f in staged))
    delta.commit_run(table, run_id, [add_action(f) for f in staged], commit_schema, manifest)
    if uris:
        staging = strip(writer.staging(output, run_id))
        retry_transient(lambda: fs.rm(staging, recursive=True), f"remove {staging}")
    report.runs_migrated.append(run_id)
    report.rows += sum(f.rows for f in staged)
    return manifest


def _read_v1_part(fs: AbstractFileSystem, uri: str) -> pa.Table:
    """One v1 part file, read as a file (never as a hive dataset: ``run_id`` is a column and a folder name)."""
    import pyarrow.parquet as pq

    with fs.open(strip(uri), "rb") as fh:
        return pq.ParquetFile(fh).read()


def _read_v1_schema(fs: AbstractFileSystem, uri: str) -> pa.Schema:
    import pyarrow.parquet as pq

    with fs.open(strip(uri), "rb") as fh:
        return pq.ParquetFile(fh).schema_arrow


def _v2_schema(v1: pa.Schema) -> pa.Schema:
    """The v1 row schema as v2 history: the embedding as ``list<float32>`` and the ``run_date`` partition column."""
    item = pa.list_(pa.field("element", pa.float32()))
    fields = [pa.field(f.name, item) if f.name == delta.EMBEDDING else f for f in v1 if f.name != delta.PARTITION]
    return pa.schema([*fields, pa.field(delta.PARTITION, pa.date32())], metadata=v1.metadata)


def _table_schema(table: DeltaTable) -> pa.Schema:
    return pa.schema(table.schema().to_arrow())  # arro3 schema -> pyarrow


def _rewrite(
    output: str, storage_options: dict[str, Any] | None, run_id: str, run_date: str, part: pa.Table
) -> writer.StagedFile:
    """Write one v1 part as a v2 data file (``run_date=D/part-<run_id>-<hash>.parquet``: a rerun rewrites the
    same file) through the run's own write stage."""
    schema = _v2_schema(part.schema)
    for col in writer.TIMING_COLS.values():  # the write stage sums these for a run's timings: none here
        part = part.append_column(col, pa.array([0.0] * part.num_rows, pa.float64()))
    file_writer = writer.PartWriter(output, run_id, run_date, storage_options, delta.file_schema(schema))
    return file_writer.write(part)


def v2_manifest(doc: dict[str, Any], *, files: int, size: int) -> dict[str, Any]:
    """The v1 manifest as a v2 run's: the count and size of its data files instead of their list (the commit
    names the files), the current versions, no profile or health (a v1 run had none), a note that it was migrated."""
    out = {"profile": None, "health": None, **doc, "files": files, "bytes": size, "manifest_version": MANIFEST_VERSION}
    out["schema_version"] = OUTPUT_SCHEMA_VERSION
    out["notes"] = [*out.get("notes", []), f"migrated from the v1 layout on {_now()[:10]}"]
    return out


def _backup_and_rewrite(layout: Layout, path: str, v1: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Keep the v1 manifest in the backup, then rewrite ``runs/R.json`` as the v2 copy of the commit's manifest."""
    write_json(join(layout.output, BACKUP_DIR, RUNS_DIR, posixpath.basename(path)), v1, layout.storage_options)
    write_manifest_copy(layout, manifest)


def _move_aside(fs: AbstractFileSystem, output: str, rel: str) -> None:
    """Move ``OUT/rel`` (a folder) to ``OUT/_v1_backup/rel``; nothing to do when it is not there."""
    src, dst = strip(join(output, rel)), strip(join(output, BACKUP_DIR, rel))
    if not _exists(fs, src):
        return
    fs.makedirs(posixpath.dirname(dst), exist_ok=True)
    retry_transient(lambda: fs.mv(src, dst, recursive=True), f"move {src}")
    log.info("moved %s to %s", redact(src), redact(dst))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
