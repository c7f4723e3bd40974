"""Searching the ANN index of one model version (``ann`` builds it): hits mapped to (uri, run id) through the index's
ids table and kept only while they are ``latest``'s rows, so results respect the committed state (a retagged image
comes back once, with its latest row; rows committed after the index are missing until its next refresh)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_tagger.ann import IDS_SCHEMA, index_root, params_of, read_index, read_record, set_search
from catalog_tagger.embeddings import normalise
from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, open_catalog, run_sql
from catalog_tagger.storage import filesystem, join, strip
from catalog_tagger.tag import delta

log = logging.getLogger(__name__)

_Hits = tuple[list[float], list[str], list[str]]  # scores, uris, run ids of one query


class AnnIndex:
    """A loaded index: ``search`` maps hits to (uri, run_id) and keeps those that are still ``latest``'s rows."""

    def __init__(
        self, output: str, storage_options: dict[str, Any] | None, record: dict[str, Any], catalog: Catalog | None
    ):
        import pyarrow.dataset as pads

        self.record = record
        self.root = index_root(output, record["model_version"])
        self.index = read_index(join(self.root, record["files"]["index"]), storage_options)
        set_search(self.index, params_of(record))
        fs = filesystem(self.root, storage_options)
        paths = [strip(join(self.root, n)) for n in record["files"]["ids"]]
        self._ids = pads.dataset(paths, schema=IDS_SCHEMA, format="parquet", filesystem=fs)
        self._owns = catalog is None
        self._cat = catalog or open_catalog(output, storage_options)
        self.behind = self._runs_behind()

    def _runs_behind(self) -> int:
        """Runs of this model version committed after the index (their rows are not in it yet)."""
        if self._cat.history is None:
            return 0
        version = self.record["model_version"]
        runs = delta.runs_after(self._cat.history, int(self.record["table_version"]))
        behind = sum(1 for r in runs if r.manifest.get("model_version") == version)
        if behind:
            log.warning(
                "the index of model %s is %d run(s) behind the output: their images are not found until "
                "`catalog-tagger index` (or the nightly flow) refreshes it", version, behind,
            )  # fmt: skip
        return behind

    def close(self) -> None:
        """Close the catalog connection ``open_index`` opened (one passed in stays open)."""
        if self._owns:
            self._cat.con.close()

    def _rows_of(self, ids: np.ndarray) -> dict[int, tuple[str, str]]:
        import pyarrow.dataset as pads

        wanted = pa.array(np.unique(ids[ids >= 0]), pa.int64())
        table = self._ids.to_table(filter=pads.field("id").isin(wanted))
        pairs = zip(table["uri"].to_pylist(), table["run_id"].to_pylist(), strict=True)
        return dict(zip(table["id"].to_pylist(), pairs, strict=True))

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

    def _filter(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[_Hits]:
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
