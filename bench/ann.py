"""ANN index at catalog scale (``python -m bench.ann``, not part of ``make bench``): build peak RSS, index bytes per
vector, per-query latency and recall@10 against brute force of the index ``catalog_tagger.ann`` builds with its
default parameters (``IndexParams``: the kind, training sample, nprobe), written by its streamed ``write_index``, on
synthetic vectors, plus the extrapolation to 10^8. ``--n 200000`` runs in minutes; ``--n 1000000`` is the target.

The vectors are NOT model embeddings: random Gaussian clusters (``--clusters`` centres in ``--dim`` dimensions),
each vector its centre plus a point of a 32-dimensional per-dataset subspace and a little isotropic noise, unit
length. Real embeddings likewise lie near a low-dimensional manifold; isotropic noise alone would make every
neighbour nearly equidistant (no index can rank those). Batches are generated from (seed, batch index), so the
build streams them as it streams a Delta table, and the brute force regenerates them instead of holding them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from catalog_tagger import ann
from catalog_tagger.embeddings import normalise

log = logging.getLogger("bench.ann")
BATCH = 50_000
LATENT = 32


def _space(dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(clusters, dim)).astype(np.float32), rng.normal(size=(LATENT, dim)).astype(np.float32)


def batch(i: int, rows: int, space: tuple[np.ndarray, np.ndarray], seed: int) -> np.ndarray:
    """Vectors ``i * BATCH ...``: a pure function of (seed, i)."""
    centres, basis = space
    rng = np.random.default_rng([seed, i + 2])  # i = -2: queries, -1: training sample
    x = centres[rng.integers(0, len(centres), rows)]
    x += (rng.standard_normal((rows, LATENT), dtype=np.float32) @ basis) * 0.15
    x += rng.standard_normal(x.shape, dtype=np.float32) * 0.05  # float32 draws: no float64 temporaries
    return normalise(x)


def _batches(n: int, space: tuple[np.ndarray, np.ndarray], seed: int) -> Any:
    for i, start in enumerate(range(0, n, BATCH)):
        yield batch(i, min(BATCH, n - start), space, seed)


def _build(args: argparse.Namespace, path: str, queue: Any) -> None:
    """In a fresh process: train on a sample, add batch by batch, write the index; report seconds and peak RSS."""

    space = _space(args.dim, args.clusters, args.seed)
    params = _params(args)
    kind = ann.index_kind(args.n, args.dim, params)
    t0 = time.perf_counter()
    index = ann.new_index(kind, args.dim)
    if kind != "Flat":
        sample = batch(-1, params.train_max, space, args.seed)  # an independent draw of the same distribution
        index.train(sample)
        del sample
    t_train = time.perf_counter() - t0
    for m in _batches(args.n, space, args.seed):
        index.add(m)
    seconds = time.perf_counter() - t0
    ann.write_index(index, path, None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    size = Path(path).stat().st_size
    queue.put({"kind": kind, "build_s": seconds, "train_s": t_train, "peak_rss_bytes": rss, "index_bytes": size,
               "bytes_per_vector": round(size / args.n, 1)})  # fmt: skip


def _params(args: argparse.Namespace) -> ann.IndexParams:
    """The library's defaults, but for what the command line names."""
    given = {"codes": args.codes, "train_max": args.train}
    return ann.IndexParams(**{k: v for k, v in given.items() if v is not None})


def _truth(q: np.ndarray, n: int, space: tuple[np.ndarray, np.ndarray], seed: int, k: int) -> np.ndarray:
    """Exact top-k ids by brute force over the regenerated batches (a running top-k per query)."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for b, m in enumerate(_batches(n, space, seed)):
        s = q @ m.T
        ids = np.broadcast_to(np.arange(b * BATCH, b * BATCH + len(m)), s.shape)
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        top = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def _measure(index: Any, q: np.ndarray, truth: np.ndarray, params: ann.IndexParams, k: int) -> dict[str, float]:
    ann.set_search(index, params)
    nprobe = params.nprobe
    lat, found = [], []
    for v in q:  # one query at a time: what `similar` does
        t = time.perf_counter()
        _, ids = index.search(v[None, :], k)
        lat.append(time.perf_counter() - t)
        found.append(ids[0])
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))
    return {"nprobe": nprobe, "recall_at_10": round(recall, 4), "p50_ms": round(1e3 * float(np.median(lat)), 3),
            "p95_ms": round(1e3 * float(np.percentile(lat, 95)), 3)}  # fmt: skip


def _extrapolate(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """10^8 vectors at the measured bytes per vector and add rate (the training and nlist do not scale by
    themselves: see the note)."""
    rate = args.n / max(res["build_s"] - res["train_s"], 1e-9)
    return {
        "vectors": 10**8,
        "index_gib": round(10**8 * res["bytes_per_vector"] / 2**30, 1),
        "ids_table_gib_approx": round(10**8 * 100 / 2**30, 1),  # uri + run id, ~100 bytes a row (Parquet, on disk)
        "add_hours_at_measured_rate": round(10**8 / rate / 3600, 2),
        "note": "the codes do not fit one machine's RAM: on-disk inverted lists (faiss OnDiskInvertedLists, built "
        "as shards merged on disk) or shards searched in parallel; at the same nlist a probed list holds 100x the "
        "vectors: raise nlist (~2^16, trained on a few million vectors) to keep ~50 ms per query",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--train", type=int, default=None, help="training sample (default: the library's train_max)")
    p.add_argument("--codes", default=None, help="IVF codes, e.g. SQ8 or PQ64,Refine(SQ8) (default: the library's)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128, 256], help="the library's default: 128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.faiss")
        queue: Any = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_build, args=(args, path, queue))
        proc.start()
        built = queue.get(timeout=3600)
        proc.join()
        log.info("built %s in %.1f s (train %.1f s), peak RSS %.0f MiB", built["kind"], built["build_s"],
                 built["train_s"], built["peak_rss_bytes"] / 2**20)  # fmt: skip
        t = time.perf_counter()
        index = ann.read_index(path, None)  # what every `similar` call pays before its query
        built["load_s"] = round(time.perf_counter() - t, 2)
    space = _space(args.dim, args.clusters, args.seed)
    q = batch(-2, args.queries, space, args.seed)  # fresh queries of the same distribution
    t = time.perf_counter()
    truth = _truth(q, args.n, space, args.seed, 10)
    log.info("brute force: %.1f s for %d queries", time.perf_counter() - t, args.queries)
    load_before = os.getloadavg()[0]  # this machine is shared: latency figures carry the load they ran under
    rows = [_measure(index, q, truth, dataclasses.replace(_params(args), nprobe=nprobe), 10) for nprobe in args.nprobe]
    for r in rows:
        log.info("nprobe %(nprobe)d: recall@10 %(recall_at_10).3f, p50 %(p50_ms).2f ms, p95 %(p95_ms).2f ms", r)
    data = (
        f"synthetic, NOT model embeddings: {args.clusters} random Gaussian cluster centres + a point of a shared "
        f"{LATENT}-d subspace + isotropic noise, unit length, {args.dim} dims"
    )
    load = {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}
    result = {"bench": "ann", "args": vars(args), **built, "search": rows, "load_average_1min": load,
              "at_1e8": _extrapolate(built, args), "data": data}  # fmt: skip
    out = Path(args.out) / f"ann-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s\n%s", out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
