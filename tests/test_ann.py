"""The ANN index over the committed embeddings (catalog_tagger/ann.py, ann_search.py): built from a real tagged
output, searched by ``similar`` against brute force, refreshed after new runs (incremental, rebuilt when superseded
rows pile up or the model version changes), version refusals, and the IVF-SQ8 path on synthetic vectors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from catalog_tagger import ann
from catalog_tagger.ann_search import open_index
from catalog_tagger.embeddings import normalise
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
    # above the exact limit (lowered here) and without an index: refused with the command that builds one
    with pytest.raises(UserError, match=rf"the {N:,} rows of model .* run `catalog-tagger index --output"):
        similar(tagged.out, uri=tagged.kit["images"][0], k=5, exact_max=N - 1)
    r = _cli("index", "--output", tagged.out)
    assert r.returncode == 0, r.stderr
    assert f"indexed {N} vector(s)" in r.stdout and "Flat" in r.stdout
    root = Path(tagged.out) / "index" / _version(tagged.out)
    record = json.loads((root / ann.RECORD).read_text())
    assert record["kind"] == "Flat" and record["count"] == N and record["metric"] == "cosine"
    assert (root / record["files"]["index"]).exists() and all((root / f).exists() for f in record["files"]["ids"])
    for u, want in zip(tagged.kit["images"][:4], exact, strict=True):
        got = similar(tagged.out, uri=u, k=5, exact_max=N - 1)  # the index serves any size
        assert got[0]["uri"] == u and got[0]["similarity"] == 1.0
        assert all(g["method"] == "index" for g in got)
        _same_top(got, want)
        labels = [k for k in want[0] if k not in ("uri", "similarity", "method")]
        by_uri = {w["uri"]: w for w in similar(tagged.out, uri=u, k=N) if w["method"]}
        assert all(g[t] == by_uri[g["uri"]][t] for g in got for t in labels)  # labels from latest, as before
    r = _cli("index", "--output", tagged.out)  # nothing new: a refresh, same file
    assert r.returncode == 0 and f"indexed {N} vector(s)" in r.stdout, r.stderr
    assert json.loads((root / ann.RECORD).read_text())["files"] == record["files"]
    r = _cli("index", "--output", tagged.out, "--rebuild")
    again = json.loads((root / ann.RECORD).read_text())
    assert r.returncode == 0 and again["count"] == N and again["files"]["index"] != record["files"]["index"]


def test_refresh_finds_new_images_and_latest_row_once(tagged):
    version = _version(tagged.out)
    assert ann.refresh(tagged.out) is None  # no index yet: the nightly refresh leaves the output alone
    ann.build(tagged.out)
    # a second run adds images to the catalog
    generate(SynthConfig(out=str(Path(tagged.kit["root"]) / "cat"), images=6, seed=0, start=N, min_size=300,
                         max_size=400))  # fmt: skip
    second = run(tagged.cfg)
    new = sorted(query(tagged.out, f"SELECT uri FROM latest WHERE run_id = '{second.run_id}'")["uri"].to_pylist())
    assert len(new) == 6
    idx = open_index(tagged.out, None, version)
    assert idx is not None and idx.behind == 1  # the second run is not indexed yet (logged)
    idx.close()
    record = ann.refresh(tagged.out)
    assert record is not None and record["count"] == N + 6 and len(record["files"]["ids"]) == 2
    got = similar(tagged.out, uri=new[0], k=3)
    assert got[0]["uri"] == new[0] and got[0]["method"] == "index"
    # a full run retags every image: before the update the old rows are superseded and dropped, after it each
    # image comes back once, with its latest row
    third = run(tagged.cfg.model_copy(update={"full": True}))
    idx = open_index(tagged.out, None, version)
    assert idx is not None
    try:
        q = np.stack([np.ones(idx.index.d, np.float32)])
        _, uris, _ = idx.search(q, 5)
        assert uris == [[]]
        ann.refresh(tagged.out)
    finally:
        idx.close()
    idx = open_index(tagged.out, None, version)
    assert idx is not None
    try:
        scores, uris, run_ids = idx.search(np.ones((1, idx.index.d), np.float32), N + 6)
        assert idx.index.ntotal == 2 * (N + 6)
        assert sorted(uris[0]) == sorted(tagged.kit["images"] + new)  # every image once
        assert set(run_ids[0]) == {third.run_id} and np.all(np.diff(scores[0]) <= 1e-6)
    finally:
        idx.close()
    # half the vectors are superseded rows (IndexParams.stale_max 0.5): one more full run and the refresh rebuilds
    fourth = run(tagged.cfg.model_copy(update={"full": True}))
    record = ann.refresh(tagged.out)
    assert record is not None and record["count"] == N + 6 and len(record["files"]["ids"]) == 1
    root = Path(tagged.out) / "index" / version
    assert sorted(p.name for p in root.iterdir()) == sorted([ann.RECORD, *ann._files(record)])  # old files removed
    got = similar(tagged.out, uri=new[1], k=N + 6)
    assert len(got) == N + 6 and {g["uri"] for g in got} == set(tagged.kit["images"] + new)
    assert query(tagged.out, f"SELECT count(*) AS n FROM latest WHERE run_id = '{fourth.run_id}'")["n"][0].as_py() == 22


def test_new_model_version_gets_its_own_index(tagged, tiny_model_factory):
    old = _version(tagged.out)
    ann.build(tagged.out)
    other = tiny_model_factory(tagged.kit["tasks"], seed=7)  # another version of the same tasks
    run(tagged.cfg.model_copy(update={"model": other, "full": True}))
    new = _version(tagged.out)
    assert new != old
    record = ann.refresh(tagged.out)  # what the nightly flow calls after the run
    assert record is not None and record["model_version"] == new and record["count"] == N
    got = similar(tagged.out, uri=tagged.kit["images"][0], k=3)
    assert got[0]["method"] == "index" and len(got) == 3
    # the old version's index stays, but no latest row is of that version any more: its hits are all filtered
    idx = open_index(tagged.out, None, old)
    assert idx is not None
    try:
        _, uris, _ = idx.search(np.ones((1, idx.index.d), np.float32), 3)
        assert uris == [[]]
    finally:
        idx.close()


def test_ivf_index_built_from_the_output(tagged):
    """The IVF-SQ8 path of ``build`` (a lowered flat_max): trained on the streamed sample, written and read back."""
    record = ann.build(tagged.out, params=ann.IndexParams(flat_max=4, nlist=4), batch_rows=5)
    assert record["kind"] == "IVF4,SQ8" and record["count"] == N and record["params"]["nprobe"] == 128
    for u in tagged.kit["images"][:3]:
        got = similar(tagged.out, uri=u, k=4)
        assert got[0]["uri"] == u and got[0]["method"] == "index" and len(got) == 4
    assert ann.refresh(tagged.out)["kind"] == "IVF4,SQ8"  # a refresh keeps the record's parameters


def test_mismatched_model_version_is_refused(tagged):
    version = _version(tagged.out)
    ann.build(tagged.out)
    with pytest.raises(UserError, match="no latest rows of model other-version"):
        ann.build(tagged.out, model_version="other-version")
    with pytest.raises(UserError, match="no latest rows of model other-version"):
        ann.refresh(tagged.out, model_version="other-version")
    r = _cli("index", "--output", tagged.out, "--model-version", "nope")
    assert r.returncode == 2 and "no latest rows of model nope" in r.stderr and "Traceback" not in r.stderr
    # an index folder holding another version's index (copied or renamed) is refused, not searched
    src, dst = Path(tagged.out) / "index" / version, Path(tagged.out) / "index" / "other-version"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match=f"is of model {version}, not other-version"):
        open_index(tagged.out, None, "other-version")
    idx = open_index(tagged.out, None, version)
    assert idx is not None
    try:
        with pytest.raises(UserError, match="not comparable"):
            idx.search(np.ones((1, idx.index.d + 3), np.float32), 3)
    finally:
        idx.close()


def test_ivf_sq8_recall_on_synthetic_vectors():
    """The IVF-SQ8 kind keeps recall@10 >= 0.95 against the exact answer; PQ codes alone do worse, re-ranked better."""
    rng = np.random.default_rng(0)
    dim, n = 32, 6000
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    basis = rng.normal(size=(8, dim)).astype(np.float32)
    x = centres[rng.integers(0, 10, n)] + rng.normal(size=(n, 8)).astype(np.float32) @ basis * 0.3
    x = normalise(x + rng.normal(size=(n, dim)).astype(np.float32) * 0.02)
    q = x[rng.choice(n, 100, replace=False)]
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]

    def recall(params: ann.IndexParams) -> float:
        kind = ann.index_kind(n, dim, params)
        index = ann.new_index(kind, dim)
        index.train(x[:3000])
        for i in range(0, n, 1000):  # batch by batch, as the build streams
            index.add(x[i : i + 1000])
        ann.set_search(index, params)
        _, got = index.search(q, 10)
        return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)]))

    base = ann.IndexParams(flat_max=1000, nlist=32, nprobe=16)
    assert ann.index_kind(n, dim, base) == "IVF32,SQ8"
    sq8 = recall(base)
    pq = recall(dataclasses.replace(base, codes="PQ8x4"))
    refined = recall(dataclasses.replace(base, codes="PQ8x4,Refine(SQ8)", k_factor=16))
    assert sq8 >= 0.95 and refined >= 0.95, (sq8, refined)
    assert pq < 0.6, pq  # the coarse codes alone: the re-rank is what restores recall


def test_params_of_old_records():
    """A record written with parameters that no longer exist still opens with today's defaults for the rest."""
    params = ann.params_of({"params": {"flat_max": 10, "pq_m": 64, "pq_bits": 6, "nprobe": 64}})
    assert params == ann.IndexParams(flat_max=10, nprobe=64)


@pytest.mark.integration
def test_index_on_s3_builds_searches_and_refreshes(catalog_kit, s3_bucket):
    """The index lives beside an s3:// output (moto server): built, searched and refreshed through s3fs with the
    job's storage options; a second run's images are found after the refresh."""
    import s3fs

    bucket, opts = s3_bucket
    kit = catalog_kit(images=N, name="ann-s3")
    output = f"s3://{bucket}/tags"
    cfg = TagJobConfig(model=kit["model"], source=kit["source"], output=output, batch_size=8, executor="local",
                       calibrate=False, storage_options=opts)  # fmt: skip
    run(cfg)
    record = ann.build(output, opts)
    version = record["model_version"]
    fs = s3fs.S3FileSystem(**opts)
    assert fs.exists(f"{bucket}/tags/index/{version}/{ann.RECORD}") and record["count"] == N
    got = similar(output, uri=kit["images"][0], k=3, storage_options=opts, exact_max=N - 1)
    assert got[0]["uri"] == kit["images"][0] and all(g["method"] == "index" for g in got)
    generate(SynthConfig(out=str(Path(kit["root"]) / "cat"), images=3, seed=0, start=N, min_size=300,
                         max_size=400))  # fmt: skip
    second = run(cfg)
    new = query(output, f"SELECT uri FROM latest WHERE run_id = '{second.run_id}'", storage_options=opts)
    assert new.num_rows == 3
    refreshed = ann.refresh(output, opts)
    assert refreshed is not None and refreshed["count"] == N + 3
    uri = new["uri"][0].as_py()
    got = similar(output, uri=uri, k=2, storage_options=opts, exact_max=N - 1)
    assert got[0]["uri"] == uri and got[0]["method"] == "index"
    assert opts["secret"] not in json.dumps(refreshed)  # the version record never carries credentials
