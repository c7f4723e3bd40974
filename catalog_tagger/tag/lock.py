"""The output's commit lock: one commit at a time per output, on local disks and object stores alike.

An exclusively created object (``_locks/commit.lock``) holding its owner's details. A commit waits while another
run holds it, refreshes it while publishing, and takes over a lock whose owner is gone or stopped refreshing it.
On S3 the create is a conditional PUT and refresh / takeover are conditional on the lock's ETag, so a run never
removes a successor's fresh lock. A lock is stale (taken over, or removed by the next run's ``clear_stale_lock``) when
it names no owner (empty or unparseable: its writer died or the disk was full), when its owner's run is committed
(killed between its manifest and the release), when its owner's process on this host is gone, or when nobody
refreshed it for ``LOCK_STALE_S``.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from catalog_tagger.errors import CommitLockLost, CommitLockTimeout
from catalog_tagger.storage import (
    create_exclusive,
    filesystem,
    is_local,
    is_storage_error,
    protocol_of,
    redact,
    retry_transient,
    strip,
    write_bytes_atomic,
)
from catalog_tagger.tag import commit
from catalog_tagger.tag.commit import Layout

log = logging.getLogger(__name__)

LOCK_WAIT_S = 1800.0  # how long a commit waits for another run's commit on the same output
LOCK_STALE_S = 900.0  # a lock not refreshed for this long is presumed dead and taken over
LOCK_REFRESH_S = 60.0  # a long commit refreshes its lock this often, so it never looks stale
# A local lock is created empty (O_EXCL) and its body written a moment later: one that still names no owner after
# this long was never finished (disk full, process killed). Object stores PUT the body whole: no grace there.
LOCK_UNWRITTEN_S = 5.0


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
    try:
        raw, mtime, etag = _read_local(uri) if is_local(uri) else _read_stored(uri, storage_options)
    except FileNotFoundError:
        return None
    try:
        body = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        body = {}
    return _Holder(body=body if isinstance(body, dict) else {}, raw=raw, mtime=mtime, etag=etag)


def _read_local(uri: str) -> tuple[bytes, float | None, str | None]:
    path = strip(uri)
    st = os.stat(path)
    with open(path, "rb") as fh:
        return fh.read(), st.st_mtime, None


def _read_stored(uri: str, storage_options: dict[str, Any] | None) -> tuple[bytes, float | None, str | None]:
    """(body, last-modified by the store's clock, ETag) of a lock object."""
    path = strip(uri)
    fs = filesystem(uri, storage_options)
    fs.invalidate_cache(path)
    info = retry_transient(lambda: fs.info(path), f"stat {uri}")
    raw = retry_transient(lambda: fs.cat_file(path), f"read {uri}")
    modified = info.get("LastModified") or info.get("mtime")
    mtime = modified.timestamp() if isinstance(modified, datetime) else None
    return raw, mtime, _etag_of(info)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(holder: _Holder, stale_s: float, *, local: bool, committed: Callable[[str], bool]) -> str | None:
    """Why the lock ``holder`` describes is dead (None: it may be alive). ``committed``: whether a run id has a
    manifest (a committed run only had its release left to do)."""
    b = holder.body
    if not b.get("token"):
        age = time.time() - holder.mtime if holder.mtime is not None else math.inf
        if not local or age > LOCK_UNWRITTEN_S:
            return "it names no owner (empty or unreadable: its writer died or the disk was full)"
        return None
    owner = b.get("run_id")
    if isinstance(owner, str) and committed(owner):
        return f"its run {owner} is committed (it was stopped before releasing the lock)"
    if b.get("host") == socket.gethostname() and isinstance(b.get("pid"), int) and not _pid_alive(b["pid"]):
        return f"its process {b['pid']} on this host is gone"
    since = holder.mtime if holder.mtime is not None else b.get("acquired_ts")
    if since is not None and time.time() - float(since) > stale_s:
        return f"not refreshed for {time.time() - float(since):.0f} s (> {stale_s:.0f} s)"
    return None


def _break_lock(uri: str, holder: _Holder, storage_options: dict[str, Any] | None) -> None:
    """Remove a stale lock, but only the one we judged stale (never a successor's fresh lock)."""
    if is_local(uri):
        _break_local_lock(uri, holder)
    elif _is_s3(uri):
        _break_s3_lock(uri, holder, storage_options)
    else:
        log.warning(
            "commit lock %s: this store has no conditional delete; removing the stale lock unconditionally", uri
        )
        with suppress(FileNotFoundError):
            filesystem(uri, storage_options).rm(strip(uri))


def _break_local_lock(uri: str, holder: _Holder) -> None:
    """Rename the lock aside, then put it back if it was not the one judged stale (rename is atomic)."""
    path = strip(uri)
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


def _break_s3_lock(uri: str, holder: _Holder, storage_options: dict[str, Any] | None) -> None:
    """A delete conditional on the ETag read when the lock was judged stale."""
    if holder.etag is None:
        return
    path = strip(uri)
    fs = filesystem(uri, storage_options)
    bucket, key, _ = fs.split_path(path)
    try:
        retry_transient(lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=holder.etag), "unlock")
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno != errno.EINVAL:  # 412: someone replaced it since we read it; leave theirs alone
            raise
    fs.invalidate_cache(path)


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
    data = _lock_body(run_id, token)
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
        reason = _stale_reason(holder, stale_s, local=is_local(uri), committed=partial(commit.is_committed, layout))
        owner = holder.body.get("run_id", "?")
        if reason is not None:
            log.warning("run %s: taking over the commit lock of run %s: %s", run_id, owner, reason)
            _break_lock(uri, holder, layout.storage_options)
            continue
        if time.monotonic() >= deadline:
            raise _timeout(run_id, uri, holder, wait_s)
        if waiting_for != owner:
            log.info("run %s: waiting for run %s to finish committing to %s", run_id, owner, layout.output)
            waiting_for = owner
        time.sleep(min(poll_s * (1 + random.random()), max(0.0, deadline - time.monotonic())))
        poll_s = min(poll_s * 1.5, 5.0)
    if _is_s3(uri):
        lock.etag = _lock_etag(uri, layout.storage_options)
    log.debug("run %s: holds the commit lock %s", run_id, uri)
    return lock


def _lock_body(run_id: str, token: str) -> bytes:
    """The lock object's content: who holds it, from where and since when."""
    now = datetime.now(UTC)
    body = {
        "token": token,
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired_at": now.isoformat(timespec="seconds"),
        "acquired_ts": now.timestamp(),
    }
    return json.dumps(body, sort_keys=True).encode()


def _timeout(run_id: str, uri: str, holder: _Holder, wait_s: float) -> CommitLockTimeout:
    b = holder.body
    return CommitLockTimeout(
        f"run {run_id}: the commit lock {uri} is held by run {b.get('run_id', '?')} (pid {b.get('pid')} on "
        f"{b.get('host')}, since {b.get('acquired_at')}); gave up after {wait_s:g} s. "
        f"Rerun later with the same run id (nothing is lost), or delete the lock if that run is dead."
    )


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


def clear_stale_lock(layout: Layout) -> None:
    """Remove the output's commit lock if it is stale (see the module docstring), so that a killed run's lock does
    not outlive it when no later run needs to commit. Best effort: a store error is logged, never fatal."""
    uri = layout.commit_lock()
    try:
        holder = _read_lock(uri, layout.storage_options)
        if holder is None:
            return
        committed = set(commit.committed_run_ids(layout))
        reason = _stale_reason(holder, LOCK_STALE_S, local=is_local(uri), committed=committed.__contains__)
        if reason is not None:
            log.warning("removing the commit lock of run %s: %s", holder.body.get("run_id", "?"), reason)
            _break_lock(uri, holder, layout.storage_options)
    except Exception as err:
        if not is_storage_error(err):
            raise
        log.warning("could not check the commit lock %s: %s", redact(uri), err)


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
