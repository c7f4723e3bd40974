"""Run bookkeeping on the output store: the layout, staged shards, the commit (manifest last), committed runs.

A run stages part files under ``_staging/<run_id>/`` (each with a stats file written after it: a shard without
stats is not done), then commits holding the output's commit lock (``lock.py``): it records an intent, moves
the parts into ``predictions/run_date=.../run_id=.../`` and writes ``runs/<run_id>.json`` LAST. Readers only
see runs whose manifest exists, so a crash at any point leaves nothing half-visible, and a rerun finishes it.
The staging folder is removed after the lock is released; one a crash left behind is removed by the next run.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
from fsspec import AbstractFileSystem

from catalog_tagger.errors import CommitError, CommitLockLost, CommitLockTimeout, OutputWriteError, UserError
from catalog_tagger.schema import STATUS_ERROR, STATUS_OK, ManifestFile, RunManifest
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

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
PREDICTIONS_DIR = "predictions"
STAGING_DIR = "_staging"
LOCKS_DIR = "_locks"
COMMIT_LOCK = "commit.lock"
INTENT = "_commit.json"  # the recorded commit: moves + manifest, written before the first move


@dataclass(frozen=True)
class Layout:
    """Where a run's files live under OUT (all paths are URIs in the output store's scheme)."""

    output: str
    storage_options: dict[str, Any] | None = None

    def manifest(self, run_id: str) -> str:
        return join(self.output, RUNS_DIR, f"{run_id}.json")

    def partition(self, run_date: str, run_id: str) -> str:
        return join(self.output, PREDICTIONS_DIR, f"run_date={run_date}", f"run_id={run_id}")

    def staging(self, run_id: str) -> str:
        return join(self.output, STAGING_DIR, run_id)

    def staged(self, run_id: str, name: str) -> str:
        """A file of a run's staging folder."""
        return join(self.staging(run_id), name)

    def commit_lock(self) -> str:
        return join(self.output, LOCKS_DIR, COMMIT_LOCK)

    def rel(self, uri: str) -> str:
        """Path relative to OUT, as stored in manifests (so an output folder can be moved or synced)."""
        root = strip(self.output).rstrip("/")
        return posixpath.relpath(strip(uri), root) if "://" not in uri else strip(uri)[len(root) + 1 :]

    def abs(self, rel: str) -> str:
        return join(self.output, *rel.split("/"))

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


def _read_path(fs: AbstractFileSystem, path: str) -> bytes:
    return cast(bytes, retry_transient(lambda: fs.cat_file(path), f"read {path}"))


def _ls_fresh(fs: AbstractFileSystem, path: str) -> list[str]:
    """List a folder bypassing fsspec's listing cache (another process may have written there since)."""
    fs.invalidate_cache(path)
    return cast(list[str], retry_transient(lambda: fs.ls(path, detail=False), f"list {path}"))


# --------------------------------------------------------------------------------------------- committed runs
def committed_manifests(layout: Layout) -> list[dict[str, Any]]:
    """Every committed run, oldest first (by finish time). Only these runs' files count."""
    fs = layout.fs()
    out = []
    for name in _manifest_paths(layout):
        try:
            m = json.loads(_read_path(fs, name))
        except (json.JSONDecodeError, FileNotFoundError) as err:
            log.warning("ignoring unreadable run manifest %s: %s", name, err)
            continue
        out.append(m)
    out.sort(key=lambda m: (m.get("finished_at", ""), m.get("run_id", "")))
    return out


def _manifest_paths(layout: Layout) -> list[str]:
    try:
        names = _ls_fresh(layout.fs(), strip(join(layout.output, RUNS_DIR)))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json") and not posixpath.basename(n).startswith((".", "_")))


def committed_run_ids(layout: Layout) -> list[str]:
    """Ids of every committed run (from the manifests' names: cheap, nothing read)."""
    return [posixpath.basename(n)[: -len(".json")] for n in _manifest_paths(layout)]


def is_committed(layout: Layout, run_id: str) -> bool:
    """Whether ``run_id`` has a manifest (asked afresh: another process may have committed it a moment ago)."""
    return _exists_fresh(layout, layout.manifest(run_id))


def _exists_fresh(layout: Layout, uri: str) -> bool:
    """Whether ``uri`` exists, bypassing fsspec's listing cache (another process may have written it since)."""
    path = strip(uri)
    fs = layout.fs()
    fs.invalidate_cache(posixpath.dirname(path))
    return bool(retry_transient(lambda: fs.exists(path), f"stat {path}"))


def committed_files(layout: Layout, *, model_version: str | None = None) -> list[str]:
    """The part files of every committed run (of one model version, if given), as URIs."""
    files: list[str] = []
    for m in committed_manifests(layout):
        if model_version is not None and m.get("model_version") != model_version:
            continue
        files.extend(layout.abs(f["path"]) for f in m.get("files", []))
    return files


# --------------------------------------------------------------------------------------------- staged shards
@dataclass
class Shard:
    """One staged part file and its stats (the stats file is written after the part, under a temp name)."""

    index: int
    path: str  # staged parquet URI
    stats: dict[str, Any]


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def status_counts(table: pa.Table) -> dict[str, int]:
    """``ok`` and ``error`` rows of a table in the output schema."""
    status = table.column("status")
    return {
        "ok": int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0),
        "error": int(pc.sum(pc.equal(status, STATUS_ERROR)).as_py() or 0),
    }


def write_shard(layout: Layout, run_id: str, index: int, table: pa.Table, timing: dict[str, float]) -> Shard:
    """Stage one part: parquet first, then its stats JSON (counts, ``timing`` seconds, size); without stats a
    shard is not done."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=8192)
    staged = layout.staged(run_id, shard_name(index) + ".parquet")
    write_bytes_atomic(staged, buf.getvalue(), layout.storage_options)
    stats = {**status_counts(table), **timing, "index": index, "rows": table.num_rows, "bytes": buf.tell()}
    write_json(layout.staged(run_id, shard_name(index) + ".json"), stats, layout.storage_options)
    return Shard(index=index, path=staged, stats=stats)


def done_shards(layout: Layout, run_id: str) -> list[Shard]:
    """Shards of an uncommitted run whose stats file exists (finished); others are ignored and rewritten."""
    fs = layout.fs()
    try:
        names = _ls_fresh(fs, strip(layout.staging(run_id)))
    except FileNotFoundError:
        return []
    present = {posixpath.basename(n) for n in names}
    shards = []
    for name in sorted(names):
        base = posixpath.basename(name)
        if not (base.startswith("part-") and base.endswith(".json")):
            continue
        stats = json.loads(_read_path(fs, name))
        parquet = base[: -len(".json")] + ".parquet"
        if parquet in present:
            shards.append(Shard(index=int(stats["index"]), path=layout.staged(run_id, parquet), stats=stats))
    return shards


def read_shard(layout: Layout, shard: Shard) -> pa.Table:
    import pyarrow.parquet as pq

    fs = layout.fs()
    return retry_transient(lambda: pq.read_table(strip(shard.path), filesystem=fs), f"read {shard.path}")


def remove_shard(layout: Layout, run_id: str, shard: Shard) -> None:
    """Unstage a shard: its stats file first (so a crash in between leaves a not-done shard, never a bad one)."""
    fs = layout.fs()
    for suffix in (".json", ".parquet"):
        path = strip(layout.staged(run_id, shard_name(shard.index) + suffix))
        with suppress(FileNotFoundError):
            retry_transient(partial(fs.rm, path), f"remove {path}")


def clear_staging(layout: Layout, run_id: str) -> None:
    fs = layout.fs()
    root = strip(layout.staging(run_id))
    fs.invalidate_cache(root)
    with suppress(FileNotFoundError):
        if retry_transient(lambda: fs.exists(root), f"stat {root}"):
            retry_transient(lambda: fs.rm(root, recursive=True), f"remove {root}")


def clear_committed_staging(layout: Layout, run_ids: list[str] | None = None) -> None:
    """Remove the staging folders of committed runs: ``run_ids``, or every committed run that still has one (a run
    stopped between its manifest and this cleanup leaves it behind). Only manifests count, so a leftover is
    harmless but would stay forever; a store error here is logged, never fatal, and the next run tries again."""
    try:
        if run_ids is None:
            run_ids = sorted(set(committed_run_ids(layout)) & set(_staged_run_ids(layout)))
            if run_ids:
                log.info("removing the staging folders of committed run(s) %s", ", ".join(run_ids))
        for run_id in run_ids:
            clear_staging(layout, run_id)
    except Exception as err:
        if not is_storage_error(err):
            raise
        log.warning("could not remove leftover staging folders under %s: %s", redact(layout.output), err)


def _staged_run_ids(layout: Layout) -> list[str]:
    try:
        names = _ls_fresh(layout.fs(), strip(join(layout.output, STAGING_DIR)))
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
        hint = f"run {run_id} is not committed; its staged shards are kept: rerun with --run-id {run_id} to resume"
        if is_transient(err):  # retries exhausted: let the caller (Prefect) retry the whole run, which resumes
            log.error("writing to %s kept failing (%s: %s); %s", redact(output), type(err).__name__, err, hint)
            raise
        raise OutputWriteError(f"cannot write to output {redact(output)}: {type(err).__name__}: {err}; {hint}") from err


# --------------------------------------------------------------------------------------------- the commit
def commit(
    layout: Layout,
    run_id: str,
    shards: list[Shard],
    manifest: RunManifest,
    *,
    heartbeat: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Publish a run: record the intent, move staged parts into the partition, write the manifest LAST.

    Crash-safe: the intent file lets a rerun finish a commit that died between the moves and the manifest.
    Call it holding the output's commit lock (``lock.commit_lock``); ``heartbeat`` keeps that lock fresh.
    """
    partition = layout.partition(manifest.run_date, run_id)
    moves: list[dict[str, Any]] = [
        {"src": s.path, "dst": join(partition, posixpath.basename(strip(s.path))), "stats": s.stats}
        for s in sorted(shards, key=lambda s: s.index)
    ]
    manifest.files = [
        ManifestFile(
            path=layout.rel(m["dst"]),
            rows=m["stats"]["rows"],
            ok=m["stats"].get("ok", 0),
            error=m["stats"].get("error", 0),
            bytes=m["stats"].get("bytes"),
        )
        for m in moves
    ]
    intent = layout.staged(run_id, INTENT)
    write_json(intent, {"moves": moves, "manifest": manifest.to_dict()}, layout.storage_options)
    return finish_commit(layout, run_id, heartbeat=heartbeat)


def finish_commit(layout: Layout, run_id: str, *, heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Carry out a recorded commit intent (idempotent: moves already done are skipped), then write the manifest.

    The staging folder is left to ``clear_committed_staging``, called once the commit lock is released.
    """
    fs = layout.fs()
    intent_uri = layout.staged(run_id, INTENT)
    intent = read_json(intent_uri, layout.storage_options)
    if intent is None:
        raise FileNotFoundError(intent_uri)
    for m in intent["moves"]:
        if heartbeat is not None:
            heartbeat()
        retry_transient(partial(_move_once, fs, run_id, m["src"], m["dst"]), f"publish {m['dst']}")
    if heartbeat is not None:
        heartbeat()
    manifest: dict[str, Any] = intent["manifest"]
    write_json(layout.manifest(run_id), manifest, layout.storage_options)
    log.info("committed run %s: %d file(s)", run_id, len(manifest["files"]))
    return manifest


def _move_once(fs: AbstractFileSystem, run_id: str, src_uri: str, dst_uri: str) -> None:
    src, dst = strip(src_uri), strip(dst_uri)
    if fs.exists(src):
        fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        fs.mv(src, dst)
    elif not fs.exists(dst):
        raise CommitError(f"commit of run {run_id}: staged file {src_uri} vanished before it was published")


def pending_commit(layout: Layout, run_id: str) -> bool:
    """Whether a commit of ``run_id`` was recorded but not finished (a rerun must finish it)."""
    return _exists_fresh(layout, layout.staged(run_id, INTENT))
