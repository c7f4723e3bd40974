"""Run bookkeeping on the output store: the layout, the one Delta commit per run, committed runs, leftovers.

A run's write tasks put whole data files into ``predictions/`` (each with a sidecar under ``_staging/<run_id>/``,
``writer.py``); nothing is visible yet. The driver then commits, holding the output's commit lock (``lock.py``):
ONE Delta commit adds every file of the run and carries the run id (application transaction) and its manifest, so
every reader going through the log sees all of a run or none of it, a crash at any point leaves nothing
half-visible, and committing the same run id again is refused by a lookup under the lock. ``runs/<run_id>.json``
is a copy of the manifest written after the commit, for people and tools that read JSON; the log is the truth.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from fsspec import AbstractFileSystem

from catalog_tagger.errors import CommitLockLost, CommitLockTimeout, OutputWriteError, UserError
from catalog_tagger.schema import RunManifest
from catalog_tagger.storage import (
    filesystem,
    is_storage_error,
    is_transient,
    join,
    redact,
    retry_transient,
    strip,
    write_bytes_atomic,
)
from catalog_tagger.tag import delta
from catalog_tagger.tag.writer import STAGING_DIR, StagedFile

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import DeltaTable
    from deltalake.transaction import AddAction

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
LOCKS_DIR = "_locks"
COMMIT_LOCK = "commit.lock"
RUN_STATE = "_run.json"  # a run's state in its staging folder (run date, start, model, known table version)


@dataclass(frozen=True)
class Layout:
    """Where a run's files live under OUT (all paths are URIs in the output store's scheme)."""

    output: str
    storage_options: dict[str, Any] | None = None

    def manifest(self, run_id: str) -> str:
        """The derived JSON copy of a committed run's manifest."""
        return join(self.output, RUNS_DIR, f"{run_id}.json")

    def staging(self, run_id: str) -> str:
        return join(self.output, STAGING_DIR, run_id)

    def staged(self, run_id: str, name: str) -> str:
        """A file of a run's staging folder."""
        return join(self.staging(run_id), name)

    def commit_lock(self) -> str:
        return join(self.output, LOCKS_DIR, COMMIT_LOCK)

    def table_uri(self, name: str = delta.PREDICTIONS) -> str:
        return delta.table_uri(self.output, name)

    def delta_options(self) -> dict[str, str] | None:
        return delta.delta_options(self.output, self.storage_options)

    def history(self) -> DeltaTable | None:
        """The ``predictions`` table as of now (None before the first commit)."""
        return delta.open_table(self.table_uri(), self.delta_options())

    def fs(self) -> AbstractFileSystem:
        return filesystem(self.output, self.storage_options)


# --------------------------------------------------------------------------------------------- JSON documents
def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The JSON document at ``uri``, or None when there is none (transient store errors are retried)."""
    fs = filesystem(uri, storage_options)

    def read() -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], json.loads(fs.cat_file(strip(uri))))
        except FileNotFoundError:
            return None

    return retry_transient(read, f"read {uri}")


def write_json(uri: str, data: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(uri, json.dumps(data, indent=2, sort_keys=True, default=str).encode(), storage_options)


# --------------------------------------------------------------------------------------------- committed runs
def committed_manifest(layout: Layout, run_id: str) -> dict[str, Any] | None:
    """The manifest of ``run_id`` if it is committed (asked afresh: another process may have just committed it)."""
    table = layout.history()
    found = None if table is None else delta.find_run(table, run_id)
    return None if found is None else found.manifest


def is_committed(layout: Layout, run_id: str) -> bool:
    table = layout.history()
    return table is not None and delta.has_run(table, run_id)


def committed_run_ids(layout: Layout) -> list[str]:
    """Ids of every committed run still in the log."""
    table = layout.history()
    return [] if table is None else [r.run_id for r in delta.all_runs(table)]


# --------------------------------------------------------------------------------------------- the commit
def add_action(staged: StagedFile) -> AddAction:
    """The Delta log entry that makes one written data file part of the table."""
    from deltalake.transaction import AddAction

    return AddAction(
        path=staged.path,
        size=staged.bytes,
        partition_values={delta.PARTITION: staged.run_date},
        modification_time=staged.modified_ms,
        data_change=True,
        stats=json.dumps({"numRecords": staged.rows}),
    )


def commit(
    layout: Layout, table: DeltaTable, files: list[StagedFile], manifest: RunManifest, schema: pa.Schema
) -> dict[str, Any]:
    """Publish a run: ONE Delta commit of its files carrying its id and manifest, then the JSON copy.

    Call it holding the output's commit lock, after checking the run is not committed yet (``is_committed``).
    """
    data = manifest.to_dict()
    delta.commit_run(table, manifest.run_id, [add_action(f) for f in files], schema, data)
    write_manifest_copy(layout, data)
    return data


def write_manifest_copy(layout: Layout, manifest: dict[str, Any]) -> None:
    """``runs/<run_id>.json``: best effort (the commit already happened; a missing copy is rewritten later)."""
    try:
        write_json(layout.manifest(manifest["run_id"]), manifest, layout.storage_options)
    except Exception as err:
        if not is_storage_error(err):
            raise
        log.warning("run %s is committed but its runs/ copy could not be written: %s", manifest["run_id"], err)


# --------------------------------------------------------------------------------------------- leftovers
def clear_staging(layout: Layout, run_id: str) -> None:
    fs = layout.fs()
    root = strip(layout.staging(run_id))
    fs.invalidate_cache(root)
    with suppress(FileNotFoundError):
        if retry_transient(lambda: fs.exists(root), f"stat {root}"):
            retry_transient(lambda: fs.rm(root, recursive=True), f"remove {root}")


def clear_committed_staging(layout: Layout, run_ids: list[str] | None = None) -> None:
    """Remove the staging folders of committed runs: ``run_ids``, or every committed run that still has one (a run
    stopped between its commit and this cleanup leaves it behind), rewriting a missing ``runs/`` copy on the way.
    A store error here is logged, never fatal, and the next run tries again."""
    try:
        if run_ids is None:
            staged = set(_staged_run_ids(layout))
            table = layout.history() if staged else None
            runs = [] if table is None else [r for r in delta.all_runs(table) if r.run_id in staged]
            for run in runs:
                log.info("removing the staging folder of committed run %s", run.run_id)
                write_manifest_copy(layout, run.manifest)
            run_ids = [r.run_id for r in runs]
        for run_id in run_ids:
            clear_staging(layout, run_id)
    except Exception as err:
        if not is_storage_error(err):
            raise
        log.warning("could not remove leftover staging folders under %s: %s", redact(layout.output), err)


def _staged_run_ids(layout: Layout) -> list[str]:
    fs = layout.fs()
    folder = strip(join(layout.output, STAGING_DIR))
    fs.invalidate_cache(folder)
    try:
        names = retry_transient(lambda: fs.ls(folder, detail=False), f"list {folder}")
    except FileNotFoundError:
        return []
    return [posixpath.basename(n.rstrip("/")) for n in names]


@contextmanager
def output_errors(run_id: str, output: str) -> Iterator[None]:
    """Turn a store's final refusal of a write into one clear error saying what was kept and how to resume."""
    try:
        yield
    except (UserError, CommitLockTimeout, CommitLockLost):
        raise
    except Exception as err:
        if not is_storage_error(err):
            raise
        hint = f"run {run_id} is not committed; its written files are kept: rerun with --run-id {run_id} to resume"
        if is_transient(err):  # retries exhausted: let the caller (Prefect) retry the whole run, which resumes
            log.error("writing to %s kept failing (%s: %s); %s", redact(output), type(err).__name__, err, hint)
            raise
        raise OutputWriteError(f"cannot write to output {redact(output)}: {type(err).__name__}: {err}; {hint}") from err
