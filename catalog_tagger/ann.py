"""Approximate nearest-neighbour index (faiss) over the committed embeddings of one model version, stored beside the
output under ``OUT/index/<model_version>/``: built streaming from the history in batches, updated with the runs
committed since, searched by ``similar`` (hits filtered to the rows of ``latest``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, open_catalog, run_sql, sql_string
from catalog_tagger.schema import STATUS_OK
from catalog_tagger.storage import filesystem, join, read_bytes, redact, strip, write_bytes_atomic
from catalog_tagger.tag import delta

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

INDEX_DIR = "index"
RECORD = "index.json"
_PQ_M = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # bytes per vector of the PQ code: the largest dividing dim
_IDS_SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("uri", pa.string()), pa.field("run_id", pa.string())])


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched (stored in the record's ``params``)."""

    flat_max: int = 100_000  # at most this many vectors: exact "Flat" (inner product); above: IVF-PQ
    train_max: int = 256_000  # vectors sampled to train the IVF and PQ quantisers (bounds the build's memory)
    nlist: int = 0  # IVF lists; 0: about 4 sqrt(n), a power of two, at least 39 training vectors per list
    pq_m: int = 0  # PQ bytes per vector; 0: the largest of 64, 48, 32... dividing the dimension
    pq_bits: int = 8  # bits per PQ sub-code (4: 16x cheaper training, coarser codes)
    nprobe: int = 64  # IVF lists visited per query (recall against latency)
    seed: int = 0  # the training sample


def index_kind(count: int, dim: int, params: IndexParams) -> str:
    """The faiss factory string for ``count`` vectors of ``dim``: "Flat" or "IVF<nlist>,PQ<m>"."""
    if count <= params.flat_max:
        return "Flat"
    nlist = params.nlist or 1 << max(
        4, min(round(math.log2(4 * math.sqrt(count))), int(math.log2(params.train_max / 39)))
    )
    m = params.pq_m or next(m for m in _PQ_M if dim % m == 0)
    return f"IVF{nlist},PQ{m}" + ("" if params.pq_bits == 8 else f"x{params.pq_bits}")


def new_index(kind: str, dim: int) -> faiss.Index:
    import faiss

    return faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Lists visited per query (IVF indexes only)."""
    import faiss

    with contextlib.suppress(RuntimeError):  # not an IVF index
        faiss.extract_index_ivf(index).nprobe = nprobe


def normalise(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), so an inner product is the cosine similarity."""
    m = np.ascontiguousarray(m, dtype=np.float32)
    unit: np.ndarray = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    return unit


def matrix_of(batch: pa.RecordBatch | pa.Table, version: str) -> np.ndarray:
    """The ``embedding`` column as a (rows, dim) float32 matrix; mixed lengths are refused."""
    emb = batch.column("embedding")
    if isinstance(emb, pa.ChunkedArray):
        emb = emb.combine_chunks()
    lengths = pc.unique(pc.list_value_length(emb)).to_pylist()
    if len(lengths) != 1:
        raise UserError(f"embeddings of model {version} have mixed lengths {lengths}: the output is inconsistent")
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    matrix: np.ndarray = flat.reshape(len(batch), -1)
    return matrix


# --------------------------------------------------------------------------------------------- reading the output
def index_root(output: str, model_version: str) -> str:
    if not model_version or "/" in model_version or model_version.startswith("."):
        raise UserError(f"model version {model_version!r} cannot name an index folder")
    return join(output, INDEX_DIR, model_version)


def _in_runs(runs: list[tuple[str, Any]]) -> str:
    """A filter on ``p``'s partitions (``run_date``) and runs, which the dataset applies before reading a file."""
    dates = sorted({str(d) for _, d in runs if d is not None})
    in_dates = f"p.run_date IN ({', '.join(f'DATE {sql_string(d)}' for d in dates)}) AND " if dates else ""
    return f"{in_dates}p.run_id IN ({', '.join(sql_string(r) for r, _ in runs) or 'NULL'})"


def _source_sql(cat: Catalog, version: str, new_runs: list[delta.CommittedRun] | None) -> str:
    """The rows to index: the history rows that are ``latest``'s (a build) or every ok row of ``new_runs``."""
    ok = f"p.model_version = {sql_string(version)} AND p.status = {sql_string(STATUS_OK)}"
    if new_runs is not None:
        where = _in_runs([(r.run_id, r.manifest.get("run_date")) for r in new_runs])
        return f"SELECT p.uri, p.run_id, p.embedding FROM predictions AS p WHERE {where} AND {ok}"
    found = run_sql(
        cat.con, "SELECT DISTINCT run_id, run_date FROM latest WHERE model_version = ?", [version]
    ).to_pylist()
    where = _in_runs([(r["run_id"], r["run_date"]) for r in found])
    # latest holds one row per uri: the join keeps the history row of that run (no window: the scan streams)
    return (
        "SELECT p.uri, p.run_id, p.embedding FROM predictions AS p JOIN (SELECT uri, run_id FROM latest WHERE "
        f"model_version = {sql_string(version)}) AS l ON p.uri = l.uri AND p.run_id = l.run_id WHERE {where} AND {ok}"
    )


def _batches(cat: Catalog, sql: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    reader = cat.con.sql(sql).to_arrow_reader(batch_rows)
    for batch in reader:
        if batch.num_rows:
            yield batch


def _count(cat: Catalog, sql: str) -> int:
    return int(run_sql(cat.con, f"SELECT count(*) AS n FROM ({sql})").column("n")[0].as_py())


def _train_sample(cat: Catalog, sql: str, count: int, version: str, params: IndexParams, rows: int) -> np.ndarray:
    """A uniform random sample of at most about ``train_max`` normalised vectors (one streamed pass)."""
    rng = np.random.default_rng(params.seed)
    keep = min(1.0, params.train_max / max(count, 1))
    parts = []
    for batch in _batches(cat, sql, rows):
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
    with fs.open(strip(join(root, name)), "wb") as f, pq.ParquetWriter(f, _IDS_SCHEMA) as w:
        for batch in _batches(cat, sql, rows):
            m = normalise(matrix_of(batch, version))
            if m.shape[1] != target.index.d:
                raise UserError(f"embeddings of {m.shape[1]} floats, the index of model {version} has {target.index.d}")
            ids = np.arange(target.count + added, target.count + added + len(m), dtype=np.int64)
            target.index.add(m)
            w.write_table(pa.table([pa.array(ids), batch.column("uri"), batch.column("run_id")], schema=_IDS_SCHEMA))
            added += len(m)
    target.ids.append(name)
    target.count += added
    return added


def _save(root: str, opts: dict[str, Any] | None, stored: _Stored, record: dict[str, Any], old: str | None) -> None:
    """Write the index file under a new name, then the record (LAST: a reader sees the old index or the new)."""
    import faiss

    name = f"index-{uuid.uuid4().hex[:12]}.faiss"
    fs = filesystem(root, opts)
    with fs.open(strip(join(root, name)), "wb") as f:
        buf = faiss.serialize_index(stored.index)
        for i in range(0, len(buf), 1 << 26):  # 64 MiB at a time: no second whole copy as bytes
            f.write(buf[i : i + (1 << 26)].tobytes())
    record.update(count=stored.count, files={"index": name, "ids": stored.ids})
    write_bytes_atomic(join(root, RECORD), json.dumps(record, indent=2).encode(), opts)
    if old and old != name:
        try:
            fs.rm_file(strip(join(root, old)))
        except OSError as err:  # a leftover file is harmless: the record no longer names it
            log.warning("could not remove the previous index file %s: %s", old, err)


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


# --------------------------------------------------------------------------------------------- build / update
def _versions(cat: Catalog) -> list[str]:
    return [r["v"] for r in run_sql(cat.con, "SELECT DISTINCT model_version AS v FROM latest ORDER BY v").to_pylist()]


def build(
    output: str,
    storage_options: dict[str, Any] | None = None,
    model_version: str | None = None,
    *,
    batch_rows: int = 50_000,
    params: IndexParams | None = None,
) -> dict[str, Any]:
    """Build the index of ``model_version`` (default: the latest run's) from the embeddings of its ``latest`` rows,
    streamed from the history in batches of ``batch_rows``; returns the version record."""
    params = params or IndexParams()
    started = time.perf_counter()
    cat = open_catalog(output, storage_options)
    try:
        if cat.history is None or not cat.manifests:
            raise UserError(f"no committed runs under {redact(output)}: nothing to index")
        version = model_version or cat.manifest()["model_version"]
        if version not in _versions(cat):
            raise UserError(
                f"no latest rows of model {version} in {redact(output)} (models there: {', '.join(_versions(cat))})"
            )
        sql = _source_sql(cat, version, None)
        count = _count(cat, sql)
        first = next(_batches(cat, f"{sql} LIMIT 1", 1))
        dim = matrix_of(first, version).shape[1]
        kind = index_kind(count, dim, params)
        stored = _Stored(new_index(kind, dim), [], 0)
        if kind != "Flat":
            stored.index.train(_train_sample(cat, sql, count, version, params, batch_rows))
        root = index_root(output, version)
        _add_rows(cat, sql, stored, root, storage_options, (version, batch_rows))
        record = {
            "model_version": version, "dim": dim, "metric": "cosine", "kind": kind, "count": 0,
            "table_version": cat.history.version(), "built_at": datetime.now(UTC).isoformat(),
            "params": asdict(params), "seconds": 0.0,
        }  # fmt: skip
    finally:
        cat.con.close()
    record["seconds"] = round(time.perf_counter() - started, 3)
    _save(root, storage_options, stored, record, None)
    log.info("index of model %s: %d vector(s), %s, %.1f s", version, stored.count, kind, record["seconds"])
    return record


def _records(output: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs = filesystem(output, storage_options)
    return [p.rstrip("/").split("/")[-2] for p in fs.glob(f"{strip(output).rstrip('/')}/{INDEX_DIR}/*/{RECORD}")]


def update(
    output: str, storage_options: dict[str, Any] | None = None, *, batch_rows: int = 50_000
) -> dict[str, Any] | None:
    """Add the rows of the runs committed after the index's ``table_version`` (same model version) to the index of
    the latest run's model; a new model version rebuilds (a new index); no index at all: None."""
    cat = open_catalog(output, storage_options)
    try:
        if cat.history is None or not cat.manifests or not _records(output, storage_options):
            return None
        version = cat.manifest()["model_version"]
        record = read_record(output, storage_options, version)
        if record is None:
            log.info("model version %s has no index yet: building it", version)
            cat.con.close()
            return build(output, storage_options, version, batch_rows=batch_rows)
        runs = [r for r in delta.runs_after(cat.history, record["table_version"])
                if r.manifest.get("model_version") == version]  # fmt: skip
        record["table_version"] = cat.history.version()
        if not runs:  # nothing of this model since: only the version indexed up to moves
            write_bytes_atomic(join(index_root(output, version), RECORD), json.dumps(record, indent=2).encode(),
                               storage_options)  # fmt: skip
            return record
        started, root = time.perf_counter(), index_root(output, version)
        stored = _Stored(_load_index(root, storage_options, record), list(record["files"]["ids"]), record["count"])
        added = _add_rows(cat, _source_sql(cat, version, runs), stored, root, storage_options, (version, batch_rows))
    finally:
        cat.con.close()
    record.update(built_at=datetime.now(UTC).isoformat(), seconds=round(time.perf_counter() - started, 3))
    _save(root, storage_options, stored, record, record["files"]["index"])
    log.info("index of model %s: +%d vector(s) from %d run(s), %d in all", version, added, len(runs), stored.count)
    return record


def _load_index(root: str, storage_options: dict[str, Any] | None, record: dict[str, Any]) -> faiss.Index:
    import faiss

    data = read_bytes(join(root, record["files"]["index"]), storage_options)
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# --------------------------------------------------------------------------------------------- search
class AnnIndex:
    """A loaded index: ``search`` maps hits to (uri, run_id) and keeps those that are still ``latest``'s rows."""

    def __init__(
        self, output: str, storage_options: dict[str, Any] | None, record: dict[str, Any], catalog: Catalog | None
    ):
        import pyarrow.dataset as pads

        self.record = record
        self.root = index_root(output, record["model_version"])
        self.index = _load_index(self.root, storage_options, record)
        set_nprobe(self.index, int(record["params"].get("nprobe", 64)))
        fs = filesystem(self.root, storage_options)
        paths = [strip(join(self.root, n)) for n in record["files"]["ids"]]
        self._ids = pads.dataset(paths, schema=_IDS_SCHEMA, format="parquet", filesystem=fs)
        self._owns = catalog is None
        self._cat = catalog or open_catalog(output, storage_options)

    def close(self) -> None:
        """Close the catalog connection ``open_index`` opened (one passed in stays open)."""
        if self._owns:
            self._cat.con.close()

    def _rows_of(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        import pyarrow.dataset as pads

        wanted = pa.array(np.unique(ids[ids >= 0]), pa.int64())
        table = self._ids.to_table(filter=pads.field("id").isin(wanted))
        return dict(
            zip(
                table["id"].to_pylist(),
                zip(table["uri"].to_pylist(), table["run_id"].to_pylist(), strict=True),
                strict=True,
            )
        )

    def _latest(self, uris: set[str]) -> dict[str, str]:
        found = run_sql(
            self._cat.con, "SELECT uri, run_id FROM latest WHERE model_version = ? AND uri IN (SELECT unnest(?))",
            [self.record["model_version"], sorted(uris)],
        )  # fmt: skip
        return dict(zip(found["uri"].to_pylist(), found["run_id"].to_pylist(), strict=True))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]], list[list[str]]]:
        """The ``k`` nearest ``latest`` rows to each query vector: scores (cosine, q x k, -inf where fewer), uris
        and run ids, best first. Hits superseded by a newer run are dropped (over-fetch, then filter)."""
        q = normalise(np.atleast_2d(vectors))
        if q.shape[1] != self.index.d:
            raise UserError(
                f"query vectors of {q.shape[1]} floats, the index of model {self.record['model_version']} holds "
                f"{self.index.d}: a different model's embeddings are not comparable"
            )
        total = int(self.index.ntotal)
        fetch = min(total, max(2 * k, k + 16))
        while True:
            scores, ids = self.index.search(q, fetch)
            kept = self._filter(scores, ids, k)
            if fetch >= total or all(len(u) >= k for _, u, _ in kept):
                break
            fetch = min(total, fetch * 4)
        out = np.full((len(q), k), -np.inf, np.float32)
        for i, (s, _, _) in enumerate(kept):
            out[i, : len(s)] = s
        return out, [u for _, u, _ in kept], [r for _, _, r in kept]

    def _filter(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[tuple[list[float], list[str], list[str]]]:
        rows = self._rows_of(ids)
        live = self._latest({u for u, _ in rows.values()})
        kept = []
        for srow, irow in zip(scores, ids, strict=True):
            seen: set[str] = set()
            s_out, u_out, r_out = [], [], []
            for s, i in zip(srow.tolist(), irow.tolist(), strict=True):
                uri, run_id = rows.get(i, ("", ""))
                if i < 0 or uri in seen or live.get(uri) != run_id:
                    continue
                seen.add(uri)
                s_out.append(float(s))
                u_out.append(uri)
                r_out.append(run_id)
                if len(u_out) == k:
                    break
            kept.append((s_out, u_out, r_out))
        return kept


def open_index(
    output: str, storage_options: dict[str, Any] | None, model_version: str, *, catalog: Catalog | None = None
) -> AnnIndex | None:
    """The index of ``model_version`` (None when there is none); ``catalog`` (an open ``open_catalog``) is the
    committed state its hits are checked against (opened here when not given: then call ``close()``)."""
    record = read_record(output, storage_options, model_version)
    if record is None:
        return None
    return AnnIndex(output, storage_options, record, catalog)
