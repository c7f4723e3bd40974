"""Run bookkeeping on the output store: staging, per-shard stats, the commit lock, the commit (manifest last)."""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from catalog_tagger.errors import CommitError, CommitLockLost, CommitLockTimeout
from catalog_tagger.storage import (
    create_exclusive,
    filesystem,
    is_local,
    join,
    protocol_of,
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
MANIFEST_VERSION = 1

LOCK_WAIT_S = 1800.0  # how long a commit waits for another run's commit on the same output
LOCK_STALE_S = 900.0  # a lock not refreshed for this long is presumed dead and taken over
LOCK_REFRESH_S = 60.0  # a long commit refreshes its lock this often, so it never looks stale


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

    def commit_lock(self) -> str:
        return join(self.output, LOCKS_DIR, COMMIT_LOCK)

    def rel(self, uri: str) -> str:
        """Path relative to OUT, as stored in manifests (so an output folder can be moved or synced)."""
        root = strip(self.output).rstrip("/")
        return posixpath.relpath(strip(uri), root) if "://" not in uri else strip(uri)[len(root) + 1 :]

    def abs(self, rel: str) -> str:
        return join(self.output, *rel.split("/"))


def _fs(layout: Layout):
    return filesystem(layout.output, layout.storage_options)


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The JSON document at ``uri``, or None when there is none (transient store errors are retried)."""
    fs = filesystem(uri, storage_options)

    def read() -> dict[str, Any] | None:
        try:
            return json.loads(fs.cat_file(strip(uri)))
        except FileNotFoundError:
            return None

    return retry_transient(read, f"read {uri}")


def _ls_fresh(fs, path: str) -> list[str]:
    """List a folder bypassing fsspec's listing cache (another process may have written there since)."""
    fs.invalidate_cache(path)
    return retry_transient(lambda: fs.ls(path, detail=False), f"list {path}")


def write_json(uri: str, data: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(uri, json.dumps(data, indent=2, sort_keys=True, default=str).encode(), storage_options)


def committed_manifests(layout: Layout) -> list[dict[str, Any]]:
    """Every committed run, oldest first (by finish time). Only these runs' files count."""
    fs = _fs(layout)
    out = []
    for name in _manifest_paths(layout):
        try:
            m = json.loads(retry_transient(lambda name=name: fs.cat_file(name), f"read {name}"))
        except (json.JSONDecodeError, FileNotFoundError) as err:
            log.warning("ignoring unreadable run manifest %s: %s", name, err)
            continue
        out.append(m)
    out.sort(key=lambda m: (m.get("finished_at", ""), m.get("run_id", "")))
    return out


def _manifest_paths(layout: Layout) -> list[str]:
    try:
        names = _ls_fresh(_fs(layout), strip(join(layout.output, RUNS_DIR)))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json") and not posixpath.basename(n).startswith((".", "_")))


def committed_run_ids(layout: Layout) -> list[str]:
    """Ids of every committed run (from the manifests' names: cheap, nothing read)."""
    return [posixpath.basename(n)[: -len(".json")] for n in _manifest_paths(layout)]


def committed_files(layout: Layout, *, model_version: str | None = None) -> list[str]:
    files = []
    for m in committed_manifests(layout):
        if model_version is not None and m.get("model_version") != model_version:
            continue
        files.extend(layout.abs(f["path"]) for f in m.get("files", []))
    return files


# --------------------------------------------------------------------------------------------- staging / shards
@dataclass
class Shard:
    """One staged part file and its stats (the stats file is written after the part, under a temp name)."""

    index: int
    path: str  # staged parquet URI
    stats: dict[str, Any]


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def write_shard(layout: Layout, run_id: str, index: int, table: pa.Table, stats: dict[str, Any]) -> Shard:
    """Stage one part: parquet first, then its stats JSON; a shard without stats is not done."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=8192)
    staged = join(layout.staging(run_id), shard_name(index) + ".parquet")
    write_bytes_atomic(staged, buf.getvalue(), layout.storage_options)
    stats = {**stats, "index": index, "rows": table.num_rows, "bytes": buf.tell()}
    write_json(join(layout.staging(run_id), shard_name(index) + ".json"), stats, layout.storage_options)
    return Shard(index=index, path=staged, stats=stats)


def done_shards(layout: Layout, run_id: str) -> list[Shard]:
    """Shards of an uncommitted run whose stats file exists (finished); others are ignored and rewritten."""
    fs = _fs(layout)
    root = strip(layout.staging(run_id))
    try:
        names = _ls_fresh(fs, root)
    except FileNotFoundError:
        return []
    present = {posixpath.basename(n) for n in names}
    shards = []
    for name in sorted(names):
        base = posixpath.basename(name)
        if not (base.startswith("part-") and base.endswith(".json")):
            continue
        stats = json.loads(retry_transient(lambda name=name: fs.cat_file(name), f"read {name}"))
        parquet = join(layout.staging(run_id), base[: -len(".json")] + ".parquet")
        if base[: -len(".json")] + ".parquet" in present:
            shards.append(Shard(index=int(stats["index"]), path=parquet, stats=stats))
    return shards


def read_shard(layout: Layout, shard: Shard) -> pa.Table:
    import pyarrow.parquet as pq

    fs = _fs(layout)
    return retry_transient(lambda: pq.read_table(strip(shard.path), filesystem=fs), f"read {shard.path}")


def remove_shard(layout: Layout, run_id: str, shard: Shard) -> None:
    """Unstage a shard: its stats file first (so a crash in between leaves a not-done shard, never a bad one)."""
    fs = _fs(layout)
    for suffix in (".json", ".parquet"):
        path = strip(join(layout.staging(run_id), shard_name(shard.index) + suffix))
        with suppress(FileNotFoundError):
            retry_transient(lambda path=path: fs.rm(path), f"remove {path}")


def clear_staging(layout: Layout, run_id: str) -> None:
    fs = _fs(layout)
    root = strip(layout.staging(run_id))
    fs.invalidate_cache(root)
    try:
        if retry_transient(lambda: fs.exists(root), f"stat {root}"):
            retry_transient(lambda: fs.rm(root, recursive=True), f"remove {root}")
    except FileNotFoundError:
        pass


def commit(
    layout: Layout,
    run_id: str,
    run_date: str,
    shards: list[Shard],
    manifest: dict[str, Any],
    *,
    heartbeat: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Publish a run: record the intent, move staged parts into the partition, write the manifest LAST.

    Crash-safe: the intent file lets a rerun finish a commit that died between the moves and the manifest.
    Call it holding the output's commit lock (``commit_lock``); ``heartbeat`` keeps that lock fresh.
    """
    fs = _fs(layout)
    partition = layout.partition(run_date, run_id)
    moves = [
        {"src": s.path, "dst": join(partition, posixpath.basename(strip(s.path))), "stats": s.stats}
        for s in sorted(shards, key=lambda s: s.index)
    ]
    files = [
        {
            "path": layout.rel(m["dst"]),
            "rows": m["stats"]["rows"],
            "ok": m["stats"].get("ok", 0),
            "error": m["stats"].get("error", 0),
            "bytes": m["stats"].get("bytes"),
        }
        for m in moves
    ]
    manifest = {**manifest, "files": files, "manifest_version": MANIFEST_VERSION}
    intent = join(layout.staging(run_id), "_commit.json")
    write_json(intent, {"moves": moves, "manifest": manifest}, layout.storage_options)
    return finish_commit(layout, run_id, intent_uri=intent, fs=fs, heartbeat=heartbeat)


def finish_commit(
    layout: Layout,
    run_id: str,
    *,
    intent_uri: str | None = None,
    fs=None,
    heartbeat: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Carry out a recorded commit intent (idempotent: moves already done are skipped), then write the manifest."""
    fs = fs or _fs(layout)
    intent_uri = intent_uri or join(layout.staging(run_id), "_commit.json")
    intent = read_json(intent_uri, layout.storage_options)
    if intent is None:
        raise FileNotFoundError(intent_uri)
    for m in intent["moves"]:
        if heartbeat is not None:
            heartbeat()
        retry_transient(lambda m=m: _move_once(fs, run_id, m["src"], m["dst"]), f"publish {m['dst']}")
    if heartbeat is not None:
        heartbeat()
    write_json(layout.manifest(run_id), intent["manifest"], layout.storage_options)
    clear_staging(layout, run_id)
    log.info("committed run %s: %d file(s)", run_id, len(intent["manifest"]["files"]))
    return intent["manifest"]


def _move_once(fs, run_id: str, src_uri: str, dst_uri: str) -> None:
    src, dst = strip(src_uri), strip(dst_uri)
    if fs.exists(src):
        fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        fs.mv(src, dst)
    elif not fs.exists(dst):
        raise CommitError(f"commit of run {run_id}: staged file {src_uri} vanished before it was published")


def pending_commit(layout: Layout, run_id: str) -> bool:
    path = strip(join(layout.staging(run_id), "_commit.json"))
    fs = _fs(layout)
    fs.invalidate_cache(posixpath.dirname(path))
    return retry_transient(lambda: fs.exists(path), f"stat {path}")


# --------------------------------------------------------------------------------------------- commit lock
@dataclass
class CommitLock:
    """The output's commit lock, held by one run: an exclusively created object with its owner's details."""

    uri: str
    token: str  # random: tells our lock from a stale one's successor
    run_id: str
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    etag: str | None = None  # object stores: the lock object's ETag, for conditional refresh and delete
    refreshed: float = field(default_factory=time.monotonic)

    def refresh(self, *, every_s: float = LOCK_REFRESH_S) -> None:
        """Keep the lock fresh during a long commit; raises ``CommitLockLost`` if another run took it over."""
        if time.monotonic() - self.refreshed < every_s:
            return
        holder = _read_lock(self.uri, self.storage_options)
        if holder is None or holder.body.get("token") != self.token:
            raise CommitLockLost(f"run {self.run_id}: the commit lock {self.uri} was taken over; rerun to finish")
        if is_local(self.uri):
            os.utime(strip(self.uri))
        elif _is_s3(self.uri):
            fs = filesystem(self.uri, self.storage_options)
            try:
                out = fs.pipe_file(strip(self.uri), holder.raw, IfMatch=self.etag)
            except OSError as err:
                if err.errno == errno.EINVAL:  # 412 Precondition Failed: replaced since we read it
                    raise CommitLockLost(f"run {self.run_id}: the commit lock {self.uri} was taken over") from None
                raise
            self.etag = _etag_of(out) or _lock_etag(self.uri, self.storage_options)
        else:
            write_bytes_atomic(self.uri, holder.raw, self.storage_options)
        self.refreshed = time.monotonic()


@dataclass
class _Holder:
    body: dict[str, Any]
    raw: bytes
    mtime: float | None  # seconds since the epoch, by the store's clock
    etag: str | None


def _is_s3(uri: str) -> bool:
    return protocol_of(uri) in ("s3", "s3a")


def _etag_of(info: Any) -> str | None:
    if isinstance(info, dict):
        for key in ("ETag", "etag"):
            if info.get(key):
                return str(info[key])
    return None


def _lock_etag(uri: str, storage_options: dict[str, Any] | None) -> str | None:
    fs = filesystem(uri, storage_options)
    fs.invalidate_cache(strip(uri))
    return _etag_of(retry_transient(lambda: fs.info(strip(uri)), f"stat {uri}"))


def _read_lock(uri: str, storage_options: dict[str, Any] | None) -> _Holder | None:
    """Who holds the lock (None: nobody). A lock whose body is not written yet reads as an unknown owner."""
    path = strip(uri)
    try:
        if is_local(uri):
            st = os.stat(path)
            with open(path, "rb") as fh:
                raw = fh.read()
            mtime, etag = st.st_mtime, None
        else:
            fs = filesystem(uri, storage_options)
            fs.invalidate_cache(path)
            info = retry_transient(lambda: fs.info(path), f"stat {uri}")
            raw = retry_transient(lambda: fs.cat_file(path), f"read {uri}")
            modified = info.get("LastModified") or info.get("mtime")
            mtime = modified.timestamp() if isinstance(modified, datetime) else None
            etag = _etag_of(info)
    except FileNotFoundError:
        return None
    try:
        body = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        body = {}
    return _Holder(body=body if isinstance(body, dict) else {}, raw=raw, mtime=mtime, etag=etag)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(holder: _Holder, stale_s: float) -> str | None:
    b = holder.body
    if b.get("host") == socket.gethostname() and isinstance(b.get("pid"), int) and not _pid_alive(b["pid"]):
        return f"its process {b['pid']} on this host is gone"
    since = holder.mtime if holder.mtime is not None else b.get("acquired_ts")
    if since is not None and time.time() - float(since) > stale_s:
        return f"not refreshed for {time.time() - float(since):.0f} s (> {stale_s:.0f} s)"
    return None


def _break_lock(uri: str, holder: _Holder, storage_options: dict[str, Any] | None) -> None:
    """Remove a stale lock, but only the one we judged stale (never a successor's fresh lock)."""
    path = strip(uri)
    if is_local(uri):
        aside = f"{path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as fh:
                moved = fh.read()
            if moved != holder.raw:
                # We moved a lock another run took over a moment ago: put it back (a third run may hold it now).
                try:
                    os.link(aside, path)
                except FileExistsError:
                    log.warning("commit lock %s: a fresh lock was displaced during a stale takeover", uri)
        finally:
            os.unlink(aside)
        return
    fs = filesystem(uri, storage_options)
    if _is_s3(uri):
        if holder.etag is None:
            return
        bucket, key, _ = fs.split_path(path)
        try:
            retry_transient(lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=holder.etag), "unlock")
        except FileNotFoundError:
            pass
        except OSError as err:
            if err.errno != errno.EINVAL:  # 412: someone replaced it since we read it; leave theirs alone
                raise
        fs.invalidate_cache(path)
        return
    log.warning("commit lock %s: this store has no conditional delete; removing the stale lock unconditionally", uri)
    with suppress(FileNotFoundError):
        fs.rm(path)


def acquire_commit_lock(
    layout: Layout,
    run_id: str,
    *,
    wait_s: float = LOCK_WAIT_S,
    stale_s: float = LOCK_STALE_S,
    poll_s: float = 0.25,
) -> CommitLock:
    """Take the output's commit lock, waiting while another run commits and taking over a stale (dead) one."""
    uri = layout.commit_lock()
    token = uuid.uuid4().hex
    now = datetime.now(UTC)
    body = {
        "token": token,
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired_at": now.isoformat(timespec="seconds"),
        "acquired_ts": now.timestamp(),
    }
    data = json.dumps(body, sort_keys=True).encode()
    lock = CommitLock(uri=uri, token=token, run_id=run_id, storage_options=layout.storage_options)
    deadline = time.monotonic() + wait_s
    waiting_for = None
    while True:
        if create_exclusive(uri, data, layout.storage_options):
            break
        holder = _read_lock(uri, layout.storage_options)
        if holder is None:
            continue  # released between our attempt and our look: try again at once
        if holder.body.get("token") == token:
            break  # our create landed, but its answer was lost (and the retry found the object)
        reason = _stale_reason(holder, stale_s)
        owner = holder.body.get("run_id", "?")
        if reason is not None:
            log.warning("run %s: taking over the commit lock of run %s: %s", run_id, owner, reason)
            _break_lock(uri, holder, layout.storage_options)
            continue
        if time.monotonic() >= deadline:
            raise CommitLockTimeout(
                f"run {run_id}: the commit lock {uri} is held by run {owner} (pid {holder.body.get('pid')} on "
                f"{holder.body.get('host')}, since {holder.body.get('acquired_at')}); gave up after {wait_s:g} s. "
                f"Rerun later with the same run id (nothing is lost), or delete the lock if that run is dead."
            )
        if waiting_for != owner:
            log.info("run %s: waiting for run %s to finish committing to %s", run_id, owner, layout.output)
            waiting_for = owner
        time.sleep(min(poll_s * (1 + random.random()), max(0.0, deadline - time.monotonic())))
        poll_s = min(poll_s * 1.5, 5.0)
    if _is_s3(uri):
        lock.etag = _lock_etag(uri, layout.storage_options)
    log.debug("run %s: holds the commit lock %s", run_id, uri)
    return lock


def release_commit_lock(lock: CommitLock) -> None:
    """Remove our lock; leave it alone (with a warning) if another run took it over meanwhile."""
    holder = _read_lock(lock.uri, lock.storage_options)
    if holder is None or holder.body.get("token") != lock.token:
        log.warning("run %s: the commit lock %s was taken over by another run before release", lock.run_id, lock.uri)
        return
    if _is_s3(lock.uri):
        holder.etag = lock.etag or holder.etag
    if is_local(lock.uri):
        with suppress(FileNotFoundError):
            os.unlink(strip(lock.uri))
        return
    _break_lock(lock.uri, holder, lock.storage_options)


@contextmanager
def commit_lock(layout: Layout, run_id: str, **kwargs: Any) -> Iterator[CommitLock]:
    """``with commit_lock(layout, run_id) as lock:`` one commit to this output at a time."""
    lock = acquire_commit_lock(layout, run_id, **kwargs)
    try:
        yield lock
    finally:
        try:
            release_commit_lock(lock)
        except Exception as err:  # noqa: BLE001 - never mask the commit's own outcome; a stale lock is taken over
            log.warning("run %s: could not release the commit lock %s: %s", run_id, lock.uri, err)
