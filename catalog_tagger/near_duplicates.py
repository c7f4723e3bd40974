"""Near-duplicate images by the shared embedding: pairs of ``latest`` rows of one model version whose cosine
similarity is at least a threshold, grouped (connected pairs share a ``group``), with each side's task values and
whether their labels disagree (a data-quality signal). Bounded memory: exact block products up to ``EXACT_MAX_ROWS``
rows; above, the rows stream from the output in batches and each batch queries the ANN index (``ann``)."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.ann_search import open_index
from catalog_tagger.embeddings import (
    EXACT_MAX_ROWS,
    TaskColumn,
    batches,
    labels_of,
    latest_rows,
    live_count,
    matrix_of,
    normalise,
    source_sql,
    task_columns,
    too_many_for_exact,
)
from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, open_catalog

log = logging.getLogger(__name__)

BLOCK_ROWS = 4096  # rows per side of one block product (4096^2 x 4 bytes = 64 MiB), and query rows per index batch
DEFAULT_THRESHOLD = 0.98
REPORT_SAMPLE = 5  # pairs shown on the HTML report
REPORT_MAX_ROWS = 20_000  # the report computes near-duplicates up to this many rows (exact: ~1e11 flops, seconds)

Pair = tuple[str, str, float]  # uri_a < uri_b, cosine


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


def _exact(cat: Catalog, version: str, threshold: float) -> Iterator[Pair]:
    """Every pair at >= ``threshold``, exact (the caller keeps this to at most ``EXACT_MAX_ROWS`` rows)."""
    rows = latest_rows(cat, version, [])
    if rows.num_rows == 0:
        return
    uris = rows.column("uri").to_pylist()
    for a, b, sim in exact_pairs(normalise(matrix_of(rows, version)), threshold):
        yield (uris[a], uris[b], sim) if uris[a] < uris[b] else (uris[b], uris[a], sim)


def _index_pairs(cat: Catalog, version: str, threshold: float, k: int, batch_rows: int = BLOCK_ROWS) -> Iterator[Pair]:
    """Pairs from the ANN index of ``version``: the ``latest`` rows stream from the output ``batch_rows`` at a time,
    each batch asks the index for its rows' ``k`` nearest, those at >= ``threshold`` are kept (each pair once).
    Memory: the index, one batch and the pairs found. Refused when there is no index."""
    # its own catalog (connection): the rows stream from ``cat``'s while the index checks its hits against latest
    index = open_index(cat.output, cat.storage_options, version)
    if index is None:
        raise too_many_for_exact(cat, version, live_count(cat, version))
    seen: set[tuple[str, str]] = set()
    try:
        for batch in batches(cat, source_sql(cat, version), batch_rows):
            queries = batch.column("uri").to_pylist()
            scores, hits, _ = index.search(normalise(matrix_of(batch, version)), k + 1)  # + 1: a row finds itself
            for uri, row_scores, row_hits in zip(queries, scores, hits, strict=True):
                for score, other in zip(row_scores.tolist(), row_hits, strict=False):
                    pair = (uri, other) if uri < other else (other, uri)
                    if other != uri and score >= threshold and pair not in seen:
                        seen.add(pair)
                        yield pair[0], pair[1], min(score, 1.0)
    finally:
        index.close()


def _same(x: Any, y: Any) -> bool:
    """Labels agree: equal values, or equal sets for a multilabel list."""
    if isinstance(x, list) and isinstance(y, list):
        return sorted(map(str, x)) == sorted(map(str, y))
    return bool(x == y)


def groups(pairs: list[Pair]) -> dict[str, int]:
    """Connected images (union-find over the pairs): uri -> group number, numbered in the order of ``pairs``."""
    parent: dict[str, str] = {}

    def root(u: str) -> str:
        parent.setdefault(u, u)
        while parent[u] != u:
            parent[u] = parent[parent[u]]  # path halving
            u = parent[u]
        return u

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    number: dict[str, int] = {}
    return {u: number.setdefault(root(u), len(number)) for a, b, _ in pairs for u in (a, b)}


def _table(pairs: list[Pair], values: dict[str, dict[str, Any]], tasks: list[TaskColumn]) -> pa.Table:
    """The pairs as a table, most similar first: uri_a, uri_b, similarity, group, <task>_a, <task>_b...,
    labels_disagree (a labelled task differs; a regression value is shown, not compared)."""
    pairs = sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))
    group = groups(pairs)
    cols: dict[str, list[Any]] = {
        "uri_a": [p[0] for p in pairs],
        "uri_b": [p[1] for p in pairs],
        "similarity": [p[2] for p in pairs],
        "group": [group[p[0]] for p in pairs],
    }
    differ = [False] * len(pairs)
    for t in tasks:
        cols[f"{t.name}_a"] = [values.get(p[0], {}).get(t.name) for p in pairs]
        cols[f"{t.name}_b"] = [values.get(p[1], {}).get(t.name) for p in pairs]
        if t.labelled:
            pairs_ab = zip(cols[f"{t.name}_a"], cols[f"{t.name}_b"], strict=True)
            differ = [d or not _same(x, y) for d, (x, y) in zip(differ, pairs_ab, strict=True)]
    cols["labels_disagree"] = differ
    types = {"similarity": pa.float64(), "group": pa.int64(), "labels_disagree": pa.bool_()}
    return pa.table({name: pa.array(v, types.get(name)) for name, v in cols.items()})


def count_rows(output: str, storage_options: dict[str, Any] | None, model_version: str) -> int:
    """Rows of ``latest`` tagged by ``model_version``."""
    cat = open_catalog(output, storage_options)
    try:
        return live_count(cat, model_version)
    finally:
        cat.con.close()


def near_duplicates(
    output: str,
    storage_options: dict[str, Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    model_version: str | None = None,
    k: int = 10,
    exact_max: int = EXACT_MAX_ROWS,
) -> pa.Table:
    """Pairs of ``latest`` rows of one model version (the latest run's by default) with cosine >= ``threshold``.

    Up to ``exact_max`` rows: exact, every pair once (``uri_a < uri_b``; memory: the rows' matrix). Above: the rows
    stream from the output and each one's ``k`` nearest come from the ANN index (``catalog-tagger index``; refused
    without one), so a pair is found when one side is among the other's ``k`` nearest. Columns: ``uri_a``,
    ``uri_b``, ``similarity``, ``group`` (images connected by pairs), ``<task>_a`` / ``<task>_b`` per task and
    ``labels_disagree``; most similar first.
    """
    return _search(output, storage_options, threshold, model_version, (k, exact_max))[0]


def _search(
    output: str,
    storage_options: dict[str, Any] | None,
    threshold: float,
    model_version: str | None,
    opts: tuple[int, int],
) -> tuple[pa.Table, str]:
    """(pairs table, method); ``opts``: (neighbours per row through the index, most rows searched exactly)."""
    k, exact_max = opts
    _check(threshold, k)
    cat = open_catalog(output, storage_options)
    try:
        version = _version(cat, output, model_version)
        tasks = task_columns(cat, version)
        n = live_count(cat, version)
        if n <= exact_max:
            method, pairs = "exact", list(_exact(cat, version, threshold))
        else:
            method, pairs = "index", list(_index_pairs(cat, version, threshold, k))
        values = labels_of(cat, sorted({u for p in pairs for u in p[:2]}), [t.name for t in tasks]) if pairs else {}
    finally:
        cat.con.close()
    log.info("near-duplicates of model %s (%s, %d rows): %d pairs at >= %s", version, method, n, len(pairs), threshold)
    return _table(pairs, values, tasks), method


def summary(
    output: str, storage_options: dict[str, Any] | None, model_version: str, *, threshold: float = DEFAULT_THRESHOLD
) -> NearDupSummary | None:
    """The report's near-duplicate figures; None above ``REPORT_MAX_ROWS`` (the exact search grows with the square
    of the rows, and a search of every row through the index with the rows: the command is there for those)."""
    if count_rows(output, storage_options, model_version) > REPORT_MAX_ROWS:
        return None
    try:
        table, method = _search(output, storage_options, threshold, model_version, (10, EXACT_MAX_ROWS))
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
