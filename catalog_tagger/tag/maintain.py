"""``catalog-tagger maintain``: keep a (v2) output's Delta tables fast and small, after each night's run.

Five steps, holding the output's commit lock so that no run commits in between: merge committed runs missing from
``latest`` (a crash between a run's commit and its merge), remove the staging folders of runs that are committed or
were abandoned longer than the retention, compact small data files of both tables, vacuum the files no commit
references any more (replaced by compaction or MERGE, or written by a run that never committed) once they are older
than the retention, and checkpoint the logs so a reader replays few commit files.

The retention is what keeps a run in flight safe: its data files are recent, so vacuum leaves them alone. A run
resumed after longer than the retention may have older files: those lose their sidecar first, so the resumed run
tags those images again instead of committing a file that is gone.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from catalog_tagger.errors import UserError
from catalog_tagger.storage import filesystem, join, redact, retry_transient, strip
from catalog_tagger.tag import delta, latest, lock, migrate, writer
from catalog_tagger.tag.commit import Layout

if TYPE_CHECKING:
    from collections.abc import Callable

    from deltalake import DeltaTable
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

DEFAULT_RETENTION_HOURS = 168.0  # Delta's own default (delta.deletedFileRetentionDuration): one week
LOCK_OWNER = "maintain"  # shown as the commit lock's "run" while maintenance holds it


@dataclass
class TableUpkeep:
    """What maintenance did (or, on a dry run, would do) to one table."""

    name: str
    files_compacted: int = 0  # small files rewritten ...
    files_written: int = 0  # ... into this many
    vacuumed: list[str] = field(default_factory=list)  # paths relative to the table
    version: int | None = None  # the table version checkpointed


@dataclass(frozen=True)
class _Options:
    output: str
    storage_options: dict[str, Any] | None
    retention_hours: float
    dry_run: bool


@dataclass
class MaintainReport:
    """The outcome of one ``maintain`` call."""

    output: str
    retention_hours: float
    dry_run: bool
    merged_runs: list[str] = field(default_factory=list)  # runs caught up into latest (dry run: to catch up)
    staging_removed: list[str] = field(default_factory=list)  # run ids whose _staging folder went
    unstaged_files: list[str] = field(default_factory=list)  # data files of an uncommitted run that were vacuumed
    tables: list[TableUpkeep] = field(default_factory=list)


def maintain(
    output: str,
    storage_options: dict[str, Any] | None,
    *,
    retention_hours: float = DEFAULT_RETENTION_HOURS,
    dry_run: bool = False,
) -> MaintainReport:
    """Catch up ``latest``, clear staging, compact, vacuum and checkpoint the output (see the module docstring).

    A retention shorter than Delta's default is taken as the caller's explicit choice (the table's own minimum is
    not enforced then). ``dry_run`` changes nothing and reports what would go.
    """
    if retention_hours < 0:
        raise UserError(f"--retention-hours must be 0 or more, not {retention_hours:g}")
    migrate.refuse_old_layout(output, storage_options)
    report = MaintainReport(output=redact(output), retention_hours=retention_hours, dry_run=dry_run)
    opts = delta.delta_options(output, storage_options)
    if delta.open_table(delta.table_uri(output, delta.PREDICTIONS), opts) is None:
        log.info("%s has no predictions table yet: nothing to maintain", redact(output))
        return report
    options = _Options(output, storage_options, retention_hours, dry_run)
    with lock.commit_lock(Layout(output, storage_options), LOCK_OWNER) as held:
        report.merged_runs = _catch_up(output, storage_options, dry_run=dry_run)
        history = _open(output, delta.PREDICTIONS, opts)
        held.refresh()
        report.staging_removed = _clear_staging(options, history)
        held.refresh()

        def unstage(paths: list[str]) -> None:
            report.unstaged_files.extend(_unstage(options, set(paths), gone=set(report.staging_removed)))

        report.tables.append(_upkeep(history, delta.PREDICTIONS, options, before_vacuum=unstage))
        held.refresh()
        current = delta.open_table(delta.table_uri(output, delta.LATEST), opts)  # None: a dry run before any merge
        if current is not None:
            report.tables.append(_upkeep(current, delta.LATEST, options))
    log.info("maintained %s%s", report.output, " (dry run)" if dry_run else "")
    return report


def _open(output: str, name: str, opts: dict[str, str] | None) -> DeltaTable:
    table = delta.open_table(delta.table_uri(output, name), opts)
    if table is None:  # checked before taking the lock
        raise FileNotFoundError(delta.table_uri(output, name))
    return table


def _catch_up(output: str, storage_options: dict[str, Any] | None, *, dry_run: bool) -> list[str]:
    """Merge every committed run that ``latest`` lacks (dry run: only name them)."""
    if not dry_run:
        return latest.catch_up(output, storage_options, runs=None)
    opts = delta.delta_options(output, storage_options)
    history = _open(output, delta.PREDICTIONS, opts)
    current = delta.open_table(delta.table_uri(output, delta.LATEST), opts)
    return [
        r.run_id
        for r in delta.all_runs(history)
        if current is None or current.transaction_version(delta.LATEST_APP + r.run_id) is None
    ]


# --------------------------------------------------------------------------------------------- staging
def _clear_staging(options: _Options, history: DeltaTable) -> list[str]:
    """Remove ``_staging/<run_id>`` of runs that are committed, or untouched for longer than the retention."""
    fs = filesystem(options.output, options.storage_options)
    removed = []
    cutoff = time.time() - options.retention_hours * 3600
    for run_id in _staged_run_ids(fs, options.output):
        folder = strip(writer.staging(options.output, run_id))
        if delta.has_run(history, run_id):
            why = "committed"
        else:
            newest = _newest_mtime(fs, folder)
            if newest is not None and newest >= cutoff:
                continue  # in flight, or resumable: keep
            why = f"abandoned (untouched for more than {options.retention_hours:g} h)"
        log.info("%s staging of run %s: %s", "would remove" if options.dry_run else "removing", run_id, why)
        if not options.dry_run:
            with suppress(FileNotFoundError):  # removed meanwhile (the run's own cleanup)
                retry_transient(partial(fs.rm, folder, recursive=True), f"remove {folder}")
        removed.append(run_id)
    return removed


def _staged_run_ids(fs: AbstractFileSystem, output: str) -> list[str]:
    root = strip(join(output, writer.STAGING_DIR))
    fs.invalidate_cache(root)
    try:
        entries = retry_transient(lambda: fs.ls(root, detail=True), f"list {root}")
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def _newest_mtime(fs: AbstractFileSystem, folder: str) -> float | None:
    """Seconds since the epoch of the newest file under ``folder`` (None when it holds none)."""
    fs.invalidate_cache(folder)
    found = retry_transient(lambda: fs.find(folder, detail=True), f"list {folder}")
    times = [_mtime(info) for info in found.values()]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _mtime(info: dict[str, Any]) -> float | None:
    """A file's modification time from an fsspec listing entry (local ``mtime``; S3 ``LastModified``)."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if value is not None else None


def _unstage(options: _Options, paths: set[str], *, gone: set[str]) -> list[str]:
    """Drop the sidecars of staged files about to be vacuumed, so that their run (resumed after longer than the
    retention) re-tags those images instead of committing files that are gone. ``gone``: staging folders removed
    (or, on a dry run, to be removed) already."""
    output, storage_options = options.output, options.storage_options
    fs = filesystem(output, storage_options)
    hit = []
    for run_id in sorted(set(_staged_run_ids(fs, output)) - gone):
        for staged in writer.staged_files(output, run_id, storage_options):
            if staged.path in paths:
                hit.append(staged.path)
                if not options.dry_run:
                    writer.remove_staged(output, run_id, staged, storage_options)
    if hit:
        log.warning("%d staged data file(s) of uncommitted runs are older than the retention: unstaged", len(hit))
    return hit


# --------------------------------------------------------------------------------------------- the tables
def _upkeep(
    table: DeltaTable,
    name: str,
    options: _Options,
    *,
    before_vacuum: Callable[[list[str]], None] | None = None,
) -> TableUpkeep:
    """Compact, vacuum and checkpoint one table (dry run: list what vacuum would delete, nothing else)."""
    upkeep = TableUpkeep(name=name)
    if not options.dry_run:
        metrics = table.optimize.compact()
        upkeep.files_compacted = int(metrics.get("numFilesRemoved", 0))
        upkeep.files_written = int(metrics.get("numFilesAdded", 0))
        table.update_incremental()
    upkeep.vacuumed = _vacuum(table, options, before_vacuum)
    if not options.dry_run:
        table.update_incremental()
        table.create_checkpoint()
    upkeep.version = table.version()
    log.info(
        "%s: compacted %d file(s) into %d, vacuumed %d, version %d",
        name,
        upkeep.files_compacted,
        upkeep.files_written,
        len(upkeep.vacuumed),
        upkeep.version,
    )
    return upkeep


def _vacuum(table: DeltaTable, options: _Options, before: Callable[[list[str]], None] | None) -> list[str]:
    """Delete the files no commit references (``full``: also files never committed) older than the retention;
    returns their paths relative to the table.

    delta-rs keeps listing a removed file until its tombstone expires, even once deleted: only files still there
    count (and when there are none, no vacuum commit is written). ``before`` sees the candidates first.
    """
    hours = int(options.retention_hours)
    enforce = options.retention_hours >= DEFAULT_RETENTION_HOURS  # shorter: the caller's explicit choice
    kwargs: dict[str, Any] = {"enforce_retention_duration": enforce, "full": True}
    root = table.table_uri.rstrip("/")
    listed = {_relative(root, p) for p in table.vacuum(retention_hours=hours, dry_run=True, **kwargs)}
    candidates = sorted(listed & _files(options, root)) if listed else []
    if before is not None and candidates:
        before(candidates)
    if options.dry_run or not candidates:
        return candidates
    deleted = {_relative(root, p) for p in table.vacuum(retention_hours=hours, dry_run=False, **kwargs)}
    late = sorted(deleted - listed)  # crossed the retention since the dry run
    if before is not None and late:
        before(late)
    return sorted({*candidates, *late})


def _relative(root: str, path: str) -> str:
    """A path vacuum returned, relative to the table (it gives absolute ones for some log states)."""
    bare_root = strip(root).rstrip("/")
    bare = strip(path) if "://" in path else path  # fsspec listings of object stores come without the scheme
    return bare[len(bare_root) + 1 :] if bare.startswith(bare_root + "/") else path


def _files(options: _Options, root: str) -> set[str]:
    """Every file under the table's folder, relative to it (one paginated listing, as vacuum's own)."""
    fs = filesystem(options.output, options.storage_options)
    bare_root = strip(root).rstrip("/")
    fs.invalidate_cache(bare_root)
    found = retry_transient(lambda: fs.find(bare_root), f"list {bare_root}")
    return {_relative(root, p) for p in found}
