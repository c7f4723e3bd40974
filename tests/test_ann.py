"""The ANN index over the committed embeddings (catalog_tagger/ann.py): built from a real tagged output, searched by
``similar`` against brute force, updated after new runs, version refusals, and the IVF-PQ path on synthetic
vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from catalog_tagger import ann
from catalog_tagger.errors import UserError
from catalog_tagger.query import query
from catalog_tagger.similar import similar
from catalog_tagger.synthetic.catalog import SynthConfig, generate
from catalog_tagger.tag.job import TagJobConfig, run

N = 16


@pytest.fixture
def tagged(catalog_kit):
    kit = catalog_kit(images=N, name="ann")
    out = str(Path(kit["root"]) / "out")
    cfg = TagJobConfig(model=kit["model"], source=kit["source"], output=out, batch_size=8, executor="local",
                       calibrate=False)  # fmt: skip
    first = run(cfg)
    return SimpleNamespace(kit=kit, out=out, cfg=cfg, runs=[first])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True, timeout=120
    )


def _version(out: str) -> str:
    return query(out, "SELECT DISTINCT model_version AS v FROM latest").column("v")[0].as_py()


def _same_top(a: list[dict], b: list[dict]) -> None:
    """Same similarities rank by rank; same uris among the hits not tied with the last one."""
    assert [r["similarity"] for r in a] == pytest.approx([r["similarity"] for r in b], abs=1e-5)
    last = a[-1]["similarity"]
    sure = lambda rows: {r["uri"] for r in rows if r["similarity"] > last + 1e-5}  # noqa: E731
    assert sure(a) == sure(b)


def test_flat_index_matches_brute_force_and_cli(tagged):
    exact = [similar(tagged.out, uri=u, k=5) for u in tagged.kit["images"][:4]]
    assert all(r["method"] == "exact" for res in exact for r in res)
    r = _cli("index", "--output", tagged.out)
    assert r.returncode == 0, r.stderr
    assert f"indexed {N} vector(s)" in r.stdout and "Flat" in r.stdout
    root = Path(tagged.out) / "index" / _version(tagged.out)
    record = json.loads((root / ann.RECORD).read_text())
    assert record["kind"] == "Flat" and record["count"] == N and record["metric"] == "cosine"
    assert (root / record["files"]["index"]).exists() and all((root / f).exists() for f in record["files"]["ids"])
    for u, want in zip(tagged.kit["images"][:4], exact, strict=True):
        got = similar(tagged.out, uri=u, k=5)
        assert got[0]["uri"] == u and got[0]["similarity"] == 1.0
        assert all(g["method"] == "index" for g in got)
        _same_top(got, want)
        labels = [k for k in want[0] if k not in ("uri", "similarity", "method")]
        by_uri = {w["uri"]: w for w in similar(tagged.out, uri=u, k=N) if w["method"]}
        assert all(g[t] == by_uri[g["uri"]][t] for g in got for t in labels)  # labels from latest, as before


def test_update_finds_new_images_and_latest_row_once(tagged):
    version = _version(tagged.out)
    assert ann.update(tagged.out) is None  # no index yet
    ann.build(tagged.out)
    # a second run adds images to the catalog
    generate(SynthConfig(out=str(Path(tagged.kit["root"]) / "cat"), images=6, seed=0, start=N, min_size=300,
                         max_size=400))  # fmt: skip
    second = run(tagged.cfg)
    new = sorted(query(tagged.out, f"SELECT uri FROM latest WHERE run_id = '{second.run_id}'")["uri"].to_pylist())
    assert len(new) == 6
    record = ann.update(tagged.out)
    assert record is not None and record["count"] == N + 6 and len(record["files"]["ids"]) == 2
    got = similar(tagged.out, uri=new[0], k=3)
    assert got[0]["uri"] == new[0] and got[0]["method"] == "index"
    # a full run retags every image: before the update the old rows are superseded and dropped, after it each
    # image comes back once, with its latest row
    third = run(tagged.cfg.model_copy(update={"full": True}))
    idx = ann.open_index(tagged.out, None, version)
    assert idx is not None
    try:
        q = np.stack([np.ones(idx.index.d, np.float32)])
        _, uris, _ = idx.search(q, 5)
        assert uris == [[]]
        ann.update(tagged.out)
    finally:
        idx.close()
    idx = ann.open_index(tagged.out, None, version)
    assert idx is not None
    try:
        scores, uris, run_ids = idx.search(np.ones((1, idx.index.d), np.float32), N + 6)
        assert idx.index.ntotal == 2 * (N + 6)
        assert sorted(uris[0]) == sorted(tagged.kit["images"] + new)  # every image once
        assert set(run_ids[0]) == {third.run_id} and np.all(np.diff(scores[0]) <= 1e-6)
    finally:
        idx.close()


def test_mismatched_model_version_is_refused(tagged):
    version = _version(tagged.out)
    ann.build(tagged.out)
    with pytest.raises(UserError, match="no latest rows of model other-version"):
        ann.build(tagged.out, model_version="other-version")
    r = _cli("index", "--output", tagged.out, "--model-version", "nope")
    assert r.returncode == 2 and "no latest rows of model nope" in r.stderr and "Traceback" not in r.stderr
    # an index folder holding another version's index (copied or renamed) is refused, not searched
    src, dst = Path(tagged.out) / "index" / version, Path(tagged.out) / "index" / "other-version"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match=f"is of model {version}, not other-version"):
        ann.open_index(tagged.out, None, "other-version")
    idx = ann.open_index(tagged.out, None, version)
    assert idx is not None
    try:
        with pytest.raises(UserError, match="not comparable"):
            idx.search(np.ones((1, idx.index.d + 3), np.float32), 3)
    finally:
        idx.close()


def test_ivf_pq_recall_on_synthetic_vectors():
    """The IVF-PQ path (a lowered threshold) keeps recall@10 >= 0.9 against the exact answer."""
    rng = np.random.default_rng(0)
    dim, n = 16, 4000
    centres = rng.normal(size=(20, dim)).astype(np.float32)
    basis = rng.normal(size=(4, dim)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + rng.normal(size=(n, 4)).astype(np.float32) @ basis * 0.3
    x = ann.normalise(x + rng.normal(size=(n, dim)).astype(np.float32) * 0.02)
    # 6-bit codes: 8-bit PQ training takes minutes on a small shared CPU
    params = ann.IndexParams(flat_max=1000, train_max=2000, pq_m=16, pq_bits=6, nprobe=8)
    kind = ann.index_kind(n, dim, params)
    assert kind == "IVF32,PQ16x6"
    index = ann.new_index(kind, dim)
    index.train(x[:2000])
    for i in range(0, n, 1000):  # batch by batch, as the build streams
        index.add(x[i : i + 1000])
    ann.set_nprobe(index, params.nprobe)
    q = x[rng.choice(n, 100, replace=False)]
    _, got = index.search(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.9, recall
