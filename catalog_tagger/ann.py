"""Approximate nearest-neighbour index (faiss) over the committed embeddings of one model version, stored beside the
output under ``OUT/index/<model_version>/``: built streaming from the history in batches, refreshed with the runs
committed since (``refresh``: the nightly flow's and ``catalog-tagger index``'s call), searched by ``similar`` and
``near_duplicates`` (hits filtered to the rows of ``latest``: a retagged image is found with its latest row only).

Kinds: exact "Flat" up to ``flat_max`` vectors (dim x 4 bytes each); above, "IVF<nlist>,SQ8": an inverted file of
8-bit scalar-quantised codes (dim bytes + an 8-byte id per vector: 584 B at 576 dims), which measured recall@10
>= 0.99 where IVF-PQ64 (72 B) stopped at 0.75 (``bench/ann.py``; figures in the README)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog_tagger.embeddings import batches, count, live_count, matrix_of, normalise, source_sql
from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, open_catalog, run_sql
from catalog_tagger.storage import filesystem, join, read_bytes, redact, strip, write_bytes_atomic
from catalog_tagger.tag import delta

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

INDEX_DIR = "index"
BATCH_ROWS = 20_000  # rows read per batch: 20k x 576 floats = 46 MB, held ~3 times (Arrow, float32, normalised)
RECORD = "index.json"
IDS_SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("uri", pa.string()), pa.field("run_id", pa.string())])


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched (stored in the record's ``params``; a refresh keeps them)."""

    flat_max: int = 100_000  # at most this many vectors: exact "Flat" (inner product); above: IVF + ``codes``
    train_max: int = 100_000  # vectors sampled to train the IVF (and codes) quantisers: bounds the build's memory
    nlist: int = 0  # IVF lists; 0: about 4 sqrt(n), a power of two, at least 39 training vectors per list
    codes: str = "SQ8"  # faiss codes of the IVF: "SQ8" (dim bytes), or e.g. "PQ64,Refine(SQ8)" (PQ + re-rank)
    nprobe: int = 128  # IVF lists visited per query (recall against latency; bench/ann.py)
    k_factor: int = 8  # with a "Refine": candidates re-ranked per hit wanted
    stale_max: float = 0.5  # a refresh rebuilds when more than this share of the vectors are superseded rows
    seed: int = 0  # the training sample


def params_of(record: dict[str, Any]) -> IndexParams:
    """The record's parameters (keys of older records that no longer exist are dropped; defaults fill the rest)."""
    known = {f.name for f in fields(IndexParams)}
    return IndexParams(**{k: v for k, v in (record.get("params") or {}).items() if k in known})


def index_kind(n: int, dim: int, params: IndexParams) -> str:  # noqa: ARG001 - dim: part of the kind's choice
    """The faiss factory string for ``n`` vectors: "Flat" or "IVF<nlist>,<codes>"."""
    if n <= params.flat_max:
        return "Flat"
    nlist = params.nlist or 1 << max(4, min(round(math.log2(4 * math.sqrt(n))), int(math.log2(params.train_max / 39))))
    return f"IVF{nlist},{params.codes}"


def new_index(kind: str, dim: int) -> faiss.Index:
    import faiss

    return faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)


def set_search(index: faiss.Index, params: IndexParams) -> None:
    """Lists visited per query (IVF) and candidates re-ranked per hit (Refine); no-ops for a Flat index."""
    import faiss

    with contextlib.suppress(RuntimeError):  # not an IVF index
        faiss.extract_index_ivf(index).nprobe = params.nprobe
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        top.k_factor = float(params.k_factor)


def write_index(index: faiss.Index, uri: str, storage_options: dict[str, Any] | None) -> None:
    """Write ``index`` to ``uri`` as faiss writes it, streamed (no second copy of the index in memory)."""
    import faiss

    with filesystem(uri, storage_options).open(strip(uri), "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # type: ignore[attr-defined]  # not in the stubs


def read_index(uri: str, storage_options: dict[str, Any] | None) -> faiss.Index:
    """Read an index ``write_index`` wrote, streamed."""
    import faiss

    with filesystem(uri, storage_options).open(strip(uri), "rb") as f:
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))  # type: ignore[attr-defined]  # not in the stubs


# --------------------------------------------------------------------------------------------- reading the output
def index_root(output: str, model_version: str) -> str:
    if not model_version or "/" in model_version or model_version.startswith("."):
        raise UserError(f"model version {model_version!r} cannot name an index folder")
    return join(output, INDEX_DIR, model_version)


def _train_sample(cat: Catalog, sql: str, n: int, version: str, params: IndexParams, rows: int) -> np.ndarray:
    """A uniform random sample of at most about ``train_max`` normalised vectors (one streamed pass)."""
    rng = np.random.default_rng(params.seed)
    keep = min(1.0, params.train_max / max(n, 1))
    parts = []
    for batch in batches(cat, sql, rows):
        m = matrix_of(batch, version)
        parts.append(normalise(m[rng.random(len(m)) < keep]))
    sample = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    return sample[: params.train_max]


# --------------------------------------------------------------------------------------------- writing
@dataclass
class _Stored:
    """Files of one index (relative to its folder) and what they hold."""

    index: faiss.Index
    ids: list[str]
    count: int


def _add_rows(
    cat: Catalog, sql: str, target: _Stored, root: str, opts: dict[str, Any] | None, args: tuple[str, int]
) -> int:
    """Stream ``sql``'s rows into the index and a new ids part; returns how many were added."""
    import pyarrow.parquet as pq

    version, rows = args
    name = f"ids-{uuid.uuid4().hex[:12]}.parquet"
    fs = filesystem(root, opts)
    fs.makedirs(strip(root), exist_ok=True)
    added = 0
    with fs.open(strip(join(root, name)), "wb") as f, pq.ParquetWriter(f, IDS_SCHEMA) as w:
        for batch in batches(cat, sql, rows):
            m = normalise(matrix_of(batch, version))
            if m.shape[1] != target.index.d:
                raise UserError(f"embeddings of {m.shape[1]} floats, the index of model {version} has {target.index.d}")
            ids = np.arange(target.count + added, target.count + added + len(m), dtype=np.int64)
            target.index.add(m)
            w.write_table(pa.table([pa.array(ids), batch.column("uri"), batch.column("run_id")], schema=IDS_SCHEMA))
            added += len(m)
    target.ids.append(name)
    target.count += added
    return added


def _save(root: str, opts: dict[str, Any] | None, stored: _Stored, record: dict[str, Any], old: list[str]) -> None:
    """Write the index file under a new name, then the record (LAST: a reader sees the old index or the new), then
    remove the files of the old record that the new one no longer names."""
    name = f"index-{uuid.uuid4().hex[:12]}.faiss"
    write_index(stored.index, join(root, name), opts)
    record.update(count=stored.count, files={"index": name, "ids": stored.ids})
    write_bytes_atomic(join(root, RECORD), json.dumps(record, indent=2).encode(), opts)
    fs = filesystem(root, opts)
    for gone in set(old) - {name, *stored.ids}:
        try:
            fs.rm_file(strip(join(root, gone)))
        except OSError as err:  # a leftover file is harmless: the record no longer names it
            log.warning("could not remove the previous index file %s: %s", gone, err)


def _files(record: dict[str, Any] | None) -> list[str]:
    return [record["files"]["index"], *record["files"]["ids"]] if record and record.get("files") else []


def read_record(output: str, storage_options: dict[str, Any] | None, model_version: str) -> dict[str, Any] | None:
    """The version record of the index of ``model_version`` (None when there is none)."""
    uri = join(index_root(output, model_version), RECORD)
    if not filesystem(uri, storage_options).exists(strip(uri)):
        return None
    record: dict[str, Any] = json.loads(read_bytes(uri, storage_options))
    if record.get("model_version") != model_version:
        raise UserError(
            f"the index under {redact(uri)} is of model {record.get('model_version')}, not {model_version}: "
            "embeddings of different models are not comparable; run `catalog-tagger index` for this version"
        )
    return record


# --------------------------------------------------------------------------------------------- build / refresh
def _versions(cat: Catalog) -> list[str]:
    return [r["v"] for r in run_sql(cat.con, "SELECT DISTINCT model_version AS v FROM latest ORDER BY v").to_pylist()]


def _check_version(cat: Catalog, output: str, model_version: str | None) -> str:
    """``model_version`` (default: the latest run's), refused unless ``latest`` has rows of it."""
    if cat.history is None or not cat.manifests:
        raise UserError(f"no committed runs under {redact(output)}: nothing to index")
    version = model_version or str(cat.manifest()["model_version"])
    if version not in _versions(cat):
        raise UserError(
            f"no latest rows of model {version} in {redact(output)} (models there: {', '.join(_versions(cat))})"
        )
    return version


def build(
    output: str,
    storage_options: dict[str, Any] | None = None,
    model_version: str | None = None,
    *,
    batch_rows: int = BATCH_ROWS,
    params: IndexParams | None = None,
) -> dict[str, Any]:
    """Build the index of ``model_version`` (default: the latest run's) from the embeddings of its ``latest`` rows,
    streamed from the history in batches of ``batch_rows`` (memory: the index, the training sample and one
    batch); replaces any index of that version; returns the version record."""
    params = params or IndexParams()
    started = time.perf_counter()
    cat = open_catalog(output, storage_options)
    try:
        version = _check_version(cat, output, model_version)
        assert cat.history is not None  # checked by _check_version
        sql = source_sql(cat, version)
        n = count(cat, sql)
        dim = matrix_of(next(batches(cat, f"{sql} LIMIT 1", 1)), version).shape[1]
        kind = index_kind(n, dim, params)
        stored = _Stored(new_index(kind, dim), [], 0)
        if kind != "Flat":
            stored.index.train(_train_sample(cat, sql, n, version, params, batch_rows))
        root = index_root(output, version)
        old = _files(read_record(output, storage_options, version))
        _add_rows(cat, sql, stored, root, storage_options, (version, batch_rows))
        record = {
            "model_version": version, "dim": dim, "metric": "cosine", "kind": kind, "count": 0,
            "table_version": cat.history.version(), "built_at": datetime.now(UTC).isoformat(),
            "params": asdict(params), "seconds": 0.0,
        }  # fmt: skip
    finally:
        cat.con.close()
    record["seconds"] = round(time.perf_counter() - started, 3)
    _save(root, storage_options, stored, record, old)
    log.info("index of model %s: %d vector(s), %s, %.1f s", version, stored.count, kind, record["seconds"])
    return record


def _records(output: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs = filesystem(output, storage_options)
    return [p.rstrip("/").split("/")[-2] for p in fs.glob(f"{strip(output).rstrip('/')}/{INDEX_DIR}/*/{RECORD}")]


def _rebuild_reason(record: dict[str, Any], params: IndexParams, total: int, live: int) -> str | None:
    """Why the index should be rebuilt rather than grown: a Flat index past ``flat_max``, or too many vectors of
    superseded rows (images retagged since: filtered out at query time, but they cost memory and over-fetching)."""
    if record["kind"] == "Flat" and live > params.flat_max:
        return f"{live:,} rows are over the exact index's {params.flat_max:,}"
    if total and 1 - live / total > params.stale_max:
        return f"{total - live:,} of {total:,} vectors are superseded rows"
    return None


def refresh(
    output: str,
    storage_options: dict[str, Any] | None = None,
    model_version: str | None = None,
    *,
    batch_rows: int = BATCH_ROWS,
    create: bool = False,
) -> dict[str, Any] | None:
    """Bring the index of ``model_version`` (default: the latest run's) up to the committed state: add the ok rows
    of the runs of that version committed since the index (incremental), or build it when there is none (a new
    model version) or a rebuild is due (``_rebuild_reason``). Without ``create``, an output with no index at all
    is left alone (None): the nightly flow calls this after every run and indexes only the outputs someone
    indexed once. Superseded rows stay in the index until a rebuild; ``AnnIndex.search`` filters them out."""
    cat = open_catalog(output, storage_options)
    try:
        if not create and (cat.history is None or not cat.manifests or not _records(output, storage_options)):
            return None
        version = _check_version(cat, output, model_version)
        assert cat.history is not None  # checked by _check_version
        record = read_record(output, storage_options, version)
        if record is None:
            log.info("model version %s has no index yet: building it", version)
            reason: str | None = "no index of this version"
        else:
            upto = cat.history.version()  # the runs below are those committed up to this version
            runs = [r for r in delta.runs_after(cat.history, record["table_version"])
                    if r.version <= upto and r.manifest.get("model_version") == version]  # fmt: skip
            sql = source_sql(cat, version, runs) if runs else ""
            reason = _rebuild_reason(record, params_of(record), record["count"] + (count(cat, sql) if runs else 0),
                                     live_count(cat, version))  # fmt: skip
    finally:
        cat.con.close()
    if reason is not None or record is None:
        log.info("index of model %s: rebuilt (%s)", version, reason)
        return build(output, storage_options, version, batch_rows=batch_rows,
                     params=params_of(record) if record else None)  # fmt: skip
    return _grow(output, storage_options, record, (runs, upto), batch_rows)


def _grow(
    output: str,
    storage_options: dict[str, Any] | None,
    record: dict[str, Any],
    since: tuple[list[delta.CommittedRun], int],
    batch_rows: int,
) -> dict[str, Any]:
    """Add the ok rows of the runs ``since`` (runs, table version they were listed at) to the index of ``record``;
    its ``table_version`` becomes that version (a run committed meanwhile is the next refresh's)."""
    version, root = record["model_version"], index_root(output, record["model_version"])
    runs, record["table_version"] = since
    started = time.perf_counter()
    cat = open_catalog(output, storage_options)
    try:
        if not runs:  # nothing of this model since: only the version indexed up to moves
            write_bytes_atomic(join(root, RECORD), json.dumps(record, indent=2).encode(), storage_options)
            return record
        stored = _Stored(read_index(join(root, record["files"]["index"]), storage_options),
                         list(record["files"]["ids"]), record["count"])  # fmt: skip
        added = _add_rows(cat, source_sql(cat, version, runs), stored, root, storage_options, (version, batch_rows))
    finally:
        cat.con.close()
    record.update(built_at=datetime.now(UTC).isoformat(), seconds=round(time.perf_counter() - started, 3))
    _save(root, storage_options, stored, record, _files(record))
    log.info("index of model %s: +%d vector(s) from %d run(s), %d in all", version, added, len(runs), stored.count)
    return record
