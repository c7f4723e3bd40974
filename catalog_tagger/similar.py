"""Nearest images by the shared embedding: ``similar`` over the ``latest`` rows of one model version, their
embeddings read from the history (``latest`` holds none): through the version's ANN index (``ann``) when one
exists, else by brute force (exact)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_tagger.ann_search import AnnIndex, open_index
from catalog_tagger.embeddings import (
    EXACT_MAX_ROWS,
    labels_of,
    latest_rows,
    live_count,
    matrix_of,
    normalise,
    task_columns,
    too_many_for_exact,
)
from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, open_catalog, run_sql
from catalog_tagger.schema import STATUS_OK


def _embed_image(image: str, model_uri: str, model_version: str, storage_options: dict[str, Any] | None) -> np.ndarray:
    """The embedding of one image file by the model of the run being searched (refused if it changed since)."""
    from catalog_tagger.errors import DecodeError
    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.model.inference import prepare_for_inference, read_image, run_batch, select_device

    try:
        model, card = load_artifact(model_uri)
    except FileNotFoundError:
        raise UserError(f"model {model_uri!r} (of the latest run) not found; pass --model") from None
    if card.version != model_version:
        raise UserError(
            f"model {model_uri!r} is now version {card.version}, but the rows were tagged by {model_version}: "
            "embeddings of different models are not comparable; pass --model with that version's artifact"
        )
    try:
        dec = read_image(image, card.image_size, storage_options)
    except DecodeError as err:
        raise UserError(f"{image}: {err}") from None
    model = prepare_for_inference(model, select_device("auto"))
    batch = np.stack([dec.array])  # a writable copy: torch refuses read-only arrays
    embedding: np.ndarray = run_batch(model, batch).output.embedding[0].numpy().astype(np.float32)
    return embedding


def similar(
    output: str,
    uri: str | None = None,
    image: str | None = None,
    k: int = 10,
    *,
    model: str | None = None,
    storage_options: dict[str, Any] | None = None,
    exact_max: int = EXACT_MAX_ROWS,
) -> list[dict[str, Any]]:
    """The ``k`` images of ``latest`` nearest to ``uri`` (a tagged image) or ``image`` (any image file).

    Cosine similarity of the embeddings. Without an index, brute force in numpy over the whole embedding matrix of
    the searched model version (rows x dim x 4 bytes), so it is refused above ``exact_max`` rows with the command
    that builds the index (10^6 rows of 576 floats would be 2.3 GB). Only rows of one model
    version are compared (embeddings of different models are not comparable): the query row's version for
    ``uri``, the latest run's for ``image``. For ``uri`` the image itself comes first with similarity 1.0.
    With an index of that version (``catalog-tagger index``) the search is approximate (exact for a "Flat" one)
    and reads only the hits. Each result: ``uri``, ``similarity``, the row's label column per task and ``method``
    ("index" or "exact").
    """
    if (uri is None) == (image is None):
        raise UserError("give exactly one of --uri (an image in the catalog) or --image (an image file)")
    if k < 1:
        raise UserError(f"-k must be at least 1, not {k}")
    cat = open_catalog(output, storage_options)
    try:
        if not cat.manifests:
            raise UserError(f"no committed runs under {output}")
        query_vec: np.ndarray | None = None
        if image is None:
            assert uri is not None  # exactly one of the two, checked above
            found = run_sql(cat.con, "SELECT model_version FROM latest WHERE uri = ?", [uri])
            if found.num_rows == 0 and "://" not in uri and os.path.abspath(uri) != uri:
                uri = os.path.abspath(uri)  # local catalogs store absolute paths
                found = run_sql(cat.con, "SELECT model_version FROM latest WHERE uri = ?", [uri])
            if found.num_rows == 0:
                raise UserError(f"{uri} has no ok row in the latest predictions of {output} (not tagged, or an error)")
            version = found.column("model_version")[0].as_py()
        else:
            latest = cat.manifest()
            version = latest["model_version"]
            query_vec = _embed_image(image, model or latest["model"], version, storage_options)
        labels = [t.name for t in task_columns(cat, version)]  # labels, and a regression task's value
        index = open_index(output, storage_options, version, catalog=cat)
        if index is not None:
            return _via_index(cat, index, uri, query_vec, k, labels)
        if (n := live_count(cat, version)) > exact_max:
            raise too_many_for_exact(cat, version, n)
        rows = latest_rows(cat, version, labels)
        if rows.num_rows == 0 or (uri is not None and uri not in rows.column("uri").to_pylist()):
            raise UserError(f"the history of {output} has no embedding for the latest rows of model {version}")
    finally:
        cat.con.close()
    return _nearest(rows, labels, version, uri, query_vec, k)


def _nearest(
    rows: pa.Table, labels: list[str], version: str, uri: str | None, query_vec: np.ndarray | None, k: int
) -> list[dict[str, Any]]:
    """The ``k`` rows nearest to row ``uri`` (when given) or to ``query_vec``, most similar first."""
    matrix = normalise(matrix_of(rows, version))
    uris = rows.column("uri").to_pylist()
    self_idx = uris.index(uri) if uri is not None else -1
    q = matrix[self_idx] if query_vec is None else normalise(query_vec)
    sims = np.clip(matrix @ q, -1.0, 1.0)
    if self_idx >= 0:
        sims[self_idx] = 1.0  # cos(x, x) is 1 by definition; float rounding must not put a twin first
    rank = sims.copy()
    if self_idx >= 0:
        rank[self_idx] = np.inf  # always in the top k, even among exact twins
    k = min(k, len(uris))
    top = np.argpartition(-rank, k - 1)[:k] if k < len(uris) else np.arange(len(uris))
    # Highest similarity first; the query image before any exact twin; then by uri so ties are stable.
    order = sorted(top.tolist(), key=lambda i: (-float(sims[i]), i != self_idx, uris[i]))
    label_values = {t: rows.column(t).to_pylist() for t in labels}
    return [
        {"uri": uris[i], "similarity": float(sims[i]), **{t: label_values[t][i] for t in labels}, "method": "exact"}
        for i in order
    ]


def _query_embedding(cat: Catalog, uri: str) -> np.ndarray:
    """The embedding of ``uri``'s ``latest`` row, read from the history (pruned to its run and partition)."""
    row = run_sql(cat.con, "SELECT run_id, run_date, model_version FROM latest WHERE uri = ?", [uri]).to_pylist()[0]
    in_date = "run_date = ? AND " if row["run_date"] is not None else ""
    params = [row["run_date"]] if row["run_date"] is not None else []
    found = run_sql(
        cat.con, f"SELECT embedding FROM predictions WHERE {in_date}run_id = ? AND uri = ? AND status = ? "
        "ORDER BY tagged_at DESC LIMIT 1", [*params, row["run_id"], uri, STATUS_OK],
    )  # fmt: skip
    if found.num_rows == 0:
        raise UserError(f"the history of {cat.output} has no embedding for the latest row of {uri}")
    vec: np.ndarray = matrix_of(found, row["model_version"])[0]
    return vec


def _via_index(
    cat: Catalog, index: AnnIndex, uri: str | None, query_vec: np.ndarray | None, k: int, labels: list[str]
) -> list[dict[str, Any]]:
    """``similar`` through the index; for ``uri`` the image itself first (similarity 1.0), found or not."""
    if query_vec is None:
        assert uri is not None  # exactly one of the two, checked by ``similar``
        query_vec = _query_embedding(cat, uri)
    scores, uris, _ = index.search(query_vec[None, :], k)
    hits = list(zip(uris[0], scores[0][: len(uris[0])].tolist(), strict=True))
    if uri is not None:
        hits = [(uri, 1.0), *((u, s) for u, s in hits if u != uri)][:k]
    by_uri = labels_of(cat, [u for u, _ in hits], labels)
    return [
        {"uri": u, "similarity": min(max(s, -1.0), 1.0), **{t: by_uri.get(u, {}).get(t) for t in labels},
         "method": "index"}
        for u, s in hits
    ]  # fmt: skip
