"""Near-duplicate images by the shared embedding: pairs of ``latest`` rows of one model version whose cosine
similarity is at least a threshold, with each side's labels and whether they disagree (a data-quality signal)."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, open_catalog, run_sql
from catalog_tagger.similar import _label_columns, _normalise, _rows

log = logging.getLogger(__name__)

EXACT_MAX_ROWS = 100_000  # up to this many rows: exact blocked products (the matrix: rows x dim x 4 bytes)
BLOCK_ROWS = 4096  # rows per side of one block product (4096^2 x 4 bytes = 64 MiB of similarities)
DEFAULT_THRESHOLD = 0.98
REPORT_SAMPLE = 5  # pairs shown on the HTML report
REPORT_MAX_ROWS = 20_000  # the report computes near-duplicates up to this many rows (exact: ~1e11 flops, seconds)


@dataclass
class NearDupSummary:
    """What the report shows: the pair count at ``threshold`` and the most similar few pairs."""

    threshold: float
    count: int
    disagree: int  # pairs whose labels differ
    method: str  # "exact" | "index"
    sample: list[dict[str, Any]] = field(default_factory=list)


def _check(threshold: float, k: int) -> None:
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"--threshold must be in (0, 1] (a cosine similarity), not {threshold}")
    if k < 1:
        raise UserError(f"-k must be at least 1, not {k}")


def _version(cat: Catalog, output: str, model_version: str | None) -> str:
    """The model version searched: ``model_version`` (refused when no committed run used it) or the latest run's."""
    if not cat.manifests:
        raise UserError(f"no committed runs under {output}")
    if model_version is None:
        return str(cat.manifest()["model_version"])
    known = sorted({str(m.get("model_version")) for m in cat.manifests})
    if model_version not in known:
        raise UserError(f"no committed run of model version {model_version!r} in {output} (known: {', '.join(known)})")
    return model_version


def _matrix(rows: pa.Table, version: str) -> np.ndarray:
    """The rows' embeddings as unit vectors (float32, rows x dim)."""
    emb = rows.column("embedding").combine_chunks()
    lengths = pc.unique(pc.list_value_length(emb)).to_pylist()
    if len(lengths) != 1:
        raise UserError(f"embeddings of model {version} have mixed lengths {lengths}: the output is inconsistent")
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return _normalise(flat.reshape(rows.num_rows, -1))


def exact_pairs(matrix: np.ndarray, threshold: float, block: int = BLOCK_ROWS) -> Iterator[tuple[int, int, float]]:
    """Every pair ``(a, b, cosine)`` with ``a < b`` and cosine >= ``threshold`` over unit rows, by block products
    (memory: one ``block x block`` similarity block beside the matrix)."""
    n = matrix.shape[0]
    for i in range(0, n, block):
        left = matrix[i : i + block]
        for j in range(i, n, block):
            sims = left @ matrix[j : j + block].T
            if j == i:  # the diagonal block: only b > a
                sims = np.triu(sims, k=1) - np.tril(np.full(sims.shape, 2.0, np.float32))
            for a, b in zip(*np.nonzero(sims >= threshold), strict=True):
                yield i + int(a), j + int(b), min(float(sims[a, b]), 1.0)


def _index_pairs(
    output: str, storage_options: dict[str, Any] | None, version: str, rows: pa.Table, threshold: float, k: int
) -> Iterator[tuple[int, int, float]]:
    """Pairs from the ANN index of ``version`` (``catalog-tagger index``): each row's ``k`` nearest, kept when at
    least ``threshold``; refused when there is no index."""
    index = _open_index(output, storage_options, version)
    if index is None:
        raise UserError(
            f"{rows.num_rows:,} rows of model {version} are too many for an exact search (over {EXACT_MAX_ROWS:,}): "
            f"run `catalog-tagger index --output {output}` first"
        )
    uris = rows.column("uri").to_pylist()
    position = {u: i for i, u in enumerate(uris)}
    seen: set[tuple[int, int]] = set()
    for start in range(0, rows.num_rows, BLOCK_ROWS):
        queries = _matrix(rows.slice(start, BLOCK_ROWS), version)
        scores, hits, _ = index.search(queries, k + 1)  # + 1: a row finds itself first
        for q, (row_scores, row_hits) in enumerate(zip(scores, hits, strict=True)):
            for score, uri in zip(row_scores, row_hits, strict=False):
                other = position.get(uri)
                if other is None or other == start + q or float(score) < threshold:
                    continue
                pair = (min(start + q, other), max(start + q, other))
                if pair not in seen:
                    seen.add(pair)
                    yield pair[0], pair[1], min(float(score), 1.0)


def _open_index(output: str, storage_options: dict[str, Any] | None, version: str) -> Any:
    try:
        from catalog_tagger import ann  # helper "index"; absent in builds without it
    except ImportError:
        return None
    return ann.open_index(output, storage_options, version)


def _same(x: Any, y: Any) -> bool:
    """Labels agree: equal values, or equal sets for a multilabel list."""
    if isinstance(x, list) and isinstance(y, list):
        return sorted(map(str, x)) == sorted(map(str, y))
    return bool(x == y)


def _table(rows: pa.Table, labels: list[str], pairs: list[tuple[int, int, float]]) -> pa.Table:
    """The pairs as a table, most similar first: uri_a, uri_b, similarity, <task>_a, <task>_b..., labels_disagree."""
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    a_idx = pa.array([p[0] for p in pairs], pa.int64())
    b_idx = pa.array([p[1] for p in pairs], pa.int64())
    cols: dict[str, pa.Array] = {
        "uri_a": rows.column("uri").take(a_idx),
        "uri_b": rows.column("uri").take(b_idx),
        "similarity": pa.array([p[2] for p in pairs], pa.float64()),
    }
    differ = [False] * len(pairs)
    for t in labels:
        cols[f"{t}_a"], cols[f"{t}_b"] = rows.column(t).take(a_idx), rows.column(t).take(b_idx)
        for i, (x, y) in enumerate(zip(cols[f"{t}_a"].to_pylist(), cols[f"{t}_b"].to_pylist(), strict=True)):
            differ[i] = differ[i] or not _same(x, y)
    cols["labels_disagree"] = pa.array(differ, pa.bool_())
    return pa.table(cols)


def _load(
    output: str, storage_options: dict[str, Any] | None, model_version: str | None
) -> tuple[str, list[str], pa.Table]:
    cat = open_catalog(output, storage_options)
    try:
        version = _version(cat, output, model_version)
        labels = _label_columns(cat, version)
        return version, labels, _rows(cat, version, labels)
    finally:
        cat.con.close()


def count_rows(output: str, storage_options: dict[str, Any] | None, model_version: str) -> int:
    """Rows of ``latest`` tagged by ``model_version``."""
    cat = open_catalog(output, storage_options)
    try:
        n = run_sql(cat.con, "SELECT count(*) AS n FROM latest WHERE model_version = ?", [model_version])
        return int(n.column("n")[0].as_py())
    finally:
        cat.con.close()


def near_duplicates(
    output: str,
    storage_options: dict[str, Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    model_version: str | None = None,
    k: int = 10,
) -> pa.Table:
    """Pairs of ``latest`` rows of one model version (the latest run's by default) with cosine >= ``threshold``.

    Up to ``EXACT_MAX_ROWS`` rows: exact, every pair once (``uri_a < uri_b``). Above: each row's ``k`` nearest
    from the ANN index (``catalog-tagger index``), refused without one. Columns: ``uri_a``, ``uri_b``,
    ``similarity``, ``<task>_a`` / ``<task>_b`` per task and ``labels_disagree``; most similar first.
    """
    return _search(output, storage_options, threshold, model_version, k)[0]


def _search(
    output: str, storage_options: dict[str, Any] | None, threshold: float, model_version: str | None, k: int
) -> tuple[pa.Table, str]:
    _check(threshold, k)
    version, labels, rows = _load(output, storage_options, model_version)
    if rows.num_rows <= EXACT_MAX_ROWS:
        method, pairs = "exact", list(exact_pairs(_matrix(rows, version), threshold) if rows.num_rows else [])
    else:
        method, pairs = "index", list(_index_pairs(output, storage_options, version, rows, threshold, k))
    log.info("near-duplicates of model %s (%s): %d pairs at >= %s", version, method, len(pairs), threshold)
    return _table(rows, labels, pairs), method


def summary(
    output: str, storage_options: dict[str, Any] | None, model_version: str, *, threshold: float = DEFAULT_THRESHOLD
) -> NearDupSummary | None:
    """The report's near-duplicate figures; None above ``REPORT_MAX_ROWS`` (the exact search grows with the square
    of the rows, and a search of every row through the index with the rows: the command is there for those)."""
    if count_rows(output, storage_options, model_version) > REPORT_MAX_ROWS:
        return None
    try:
        table, method = _search(output, storage_options, threshold, model_version, 10)
    except UserError as err:
        log.warning("report: no near-duplicates section: %s", err)
        return None
    disagree = int(pc.sum(table.column("labels_disagree")).as_py() or 0)
    return NearDupSummary(threshold, table.num_rows, disagree, method, table.slice(0, REPORT_SAMPLE).to_pylist())


def near_duplicates_section(s: NearDupSummary | None) -> str:
    """The report's section: count, disagreeing count and a sample of pairs with their labels (empty: none)."""
    if s is None:
        return ""
    esc = html.escape
    rows = "".join(
        f'<tr class="neardup" data-uri-a="{esc(p["uri_a"])}" data-uri-b="{esc(p["uri_b"])}">'
        f"<td>{esc(p['uri_a'])}</td><td>{esc(p['uri_b'])}</td><td>{p['similarity']:.4f}</td>"
        f"<td>{esc(_labels_text(p, 'a'))}</td><td>{esc(_labels_text(p, 'b'))}</td>"
        f"<td>{'yes' if p['labels_disagree'] else 'no'}</td></tr>"
        for p in s.sample
    )
    table = (
        "<table><thead><tr><th>image a</th><th>image b</th><th>cosine</th><th>labels a</th><th>labels b</th>"
        f"<th>disagree</th></tr></thead><tbody>{rows}</tbody></table>"
        if s.sample
        else ""
    )
    return (
        f'<section id="near-duplicates"><h2>Near-duplicates</h2><p><span id="neardup-count" data-value="{s.count}">'
        f"{s.count:,}</span> pairs of images at cosine &gt;= {s.threshold} ({esc(s.method)} search), "
        f'<span id="neardup-disagree" data-value="{s.disagree}">{s.disagree:,}</span> with labels that disagree.</p>'
        f'{table}<p class="note">Over the latest rows of this model version; list them all with '
        "<code>catalog-tagger near-duplicates</code>.</p></section>"
    )


def _labels_text(pair: dict[str, Any], side: str) -> str:
    suffix = f"_{side}"
    return "; ".join(
        f"{key[: -len(suffix)]}: {value}"
        for key, value in pair.items()
        if key.endswith(suffix) and key != f"uri{suffix}"
    )
