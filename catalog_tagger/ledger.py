"""Run bookkeeping on the output store: staging, per-shard stats, the commit (manifest written last), history."""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from catalog_tagger.storage import filesystem, join, strip, write_bytes_atomic

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
PREDICTIONS_DIR = "predictions"
STAGING_DIR = "_staging"
MANIFEST_VERSION = 1


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

    def rel(self, uri: str) -> str:
        """Path relative to OUT, as stored in manifests (so an output folder can be moved or synced)."""
        root = strip(self.output).rstrip("/")
        return posixpath.relpath(strip(uri), root) if "://" not in uri else strip(uri)[len(root) + 1 :]

    def abs(self, rel: str) -> str:
        return join(self.output, *rel.split("/"))


def _fs(layout: Layout):
    return filesystem(layout.output, layout.storage_options)


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    fs = filesystem(uri, storage_options)
    try:
        return json.loads(fs.cat_file(strip(uri)))
    except FileNotFoundError:
        return None


def write_json(uri: str, data: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(uri, json.dumps(data, indent=2, sort_keys=True, default=str).encode(), storage_options)


def committed_manifests(layout: Layout) -> list[dict[str, Any]]:
    """Every committed run, oldest first (by finish time). Only these runs' files count."""
    fs = _fs(layout)
    runs_dir = strip(join(layout.output, RUNS_DIR))
    try:
        names = [p for p in fs.ls(runs_dir, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        base = posixpath.basename(name)
        if base.startswith((".", "_")):
            continue
        try:
            m = json.loads(fs.cat_file(name))
        except (json.JSONDecodeError, FileNotFoundError) as err:
            log.warning("ignoring unreadable run manifest %s: %s", name, err)
            continue
        out.append(m)
    out.sort(key=lambda m: (m.get("finished_at", ""), m.get("run_id", "")))
    return out


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
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    shards = []
    for name in sorted(names):
        base = posixpath.basename(name)
        if not (base.startswith("part-") and base.endswith(".json")):
            continue
        stats = json.loads(fs.cat_file(name))
        parquet = join(layout.staging(run_id), base[: -len(".json")] + ".parquet")
        if fs.exists(strip(parquet)):
            shards.append(Shard(index=int(stats["index"]), path=parquet, stats=stats))
    return shards


def clear_staging(layout: Layout, run_id: str) -> None:
    fs = _fs(layout)
    root = strip(layout.staging(run_id))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def commit(layout: Layout, run_id: str, run_date: str, shards: list[Shard], manifest: dict[str, Any]) -> dict[str, Any]:
    """Publish a run: record the intent, move staged parts into the partition, write the manifest LAST.

    Crash-safe: the intent file lets a rerun finish a commit that died between the moves and the manifest.
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
    return finish_commit(layout, run_id, intent_uri=intent, fs=fs)


def finish_commit(layout: Layout, run_id: str, *, intent_uri: str | None = None, fs=None) -> dict[str, Any]:
    fs = fs or _fs(layout)
    intent_uri = intent_uri or join(layout.staging(run_id), "_commit.json")
    intent = read_json(intent_uri, layout.storage_options)
    if intent is None:
        raise FileNotFoundError(intent_uri)
    for m in intent["moves"]:
        src, dst = strip(m["src"]), strip(m["dst"])
        if fs.exists(src):
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.mv(src, dst)
        elif not fs.exists(dst):
            raise RuntimeError(f"commit of run {run_id}: staged file {m['src']} vanished before it was published")
    write_json(layout.manifest(run_id), intent["manifest"], layout.storage_options)
    clear_staging(layout, run_id)
    log.info("committed run %s: %d file(s)", run_id, len(intent["manifest"]["files"]))
    return intent["manifest"]


def pending_commit(layout: Layout, run_id: str) -> bool:
    return _fs(layout).exists(strip(join(layout.staging(run_id), "_commit.json")))
