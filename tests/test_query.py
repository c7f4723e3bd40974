"""DuckDB views over committed runs, the query CLI, and nearest-image search; checked against pyarrow reads."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import deltalake
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from modelkit import centred_model, committed_rows
from outputkit import rows as kit_rows
from outputkit import write_v1_run

from catalog_tagger.errors import UserError
from catalog_tagger.query import RUNS_SCHEMA, VIEWS, connect, query
from catalog_tagger.similar import similar
from catalog_tagger.synthetic.catalog import SynthConfig, generate
from catalog_tagger.tag.job import TagJobConfig, run

pytestmark = pytest.mark.usefixtures("ray_local")

DOCS = Path(__file__).resolve().parent.parent / "docs" / "queries.md"
N_IMAGES = 24  # + one bad file


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    cat = generate(SynthConfig(out=str(root / "cat"), images=N_IMAGES, seed=0, min_size=300, max_size=400))
    (root / "cat" / "images" / "bad.jpg").write_bytes(b"garbage")
    model = centred_model(cat.tasks_uri, cat.images, root / "model")
    out = root / "out"
    cfg = TagJobConfig(model=model, source=str(root / "cat" / "images"), output=str(out), batch_size=16)
    first = run(cfg)
    count_after_first = query(str(out), "SELECT count(*) AS n FROM predictions").column("n")[0].as_py()
    second = run(cfg.model_copy(update={"full": True}))
    return SimpleNamespace(
        root=root, cat=cat, model=model, out=str(out), runs=[first, second], count_after_first=count_after_first
    )


def latest_rows(tagged) -> pa.Table:
    t = committed_rows(tagged.out)
    t = t.filter(pc.equal(t["run_id"], tagged.runs[1].run_id))
    return t.filter(pc.equal(t["status"], "ok"))


def test_views_exist_and_count_every_committed_row(tagged):
    con = connect(tagged.out)
    names = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    assert set(VIEWS) <= names
    assert tagged.count_after_first == N_IMAGES + 1  # one row per input image, the bad one included
    per_run = dict(con.sql("SELECT run_id, count(*) FROM predictions GROUP BY run_id").fetchall())
    assert per_run == {r.run_id: N_IMAGES + 1 for r in tagged.runs}
    assert con.sql("SELECT count(*) FROM predictions").fetchall()[0][0] == 2 * (N_IMAGES + 1)
    # latest: one ok row per image, from the newer run
    n, distinct, runs, bad = con.sql(
        "SELECT count(*), count(DISTINCT uri), list(DISTINCT run_id), count(*) FILTER (status <> 'ok') FROM latest"
    ).fetchall()[0]
    assert (n, distinct, runs, bad) == (N_IMAGES, N_IMAGES, [tagged.runs[1].run_id], 0)
    assert sorted(r[0] for r in con.sql("SELECT uri FROM latest").fetchall()) == sorted(tagged.cat.images)
    # run_date comes from the partition as a DATE, equal to the manifest's
    dates = con.sql("SELECT DISTINCT run_id, CAST(run_date AS VARCHAR) FROM predictions").fetchall()
    assert dict(dates) == {r.run_id: r.manifest["run_date"] for r in tagged.runs}


def test_runs_table_flattens_manifests(tagged):
    rows = query(tagged.out, "SELECT * FROM runs ORDER BY finished_at, run_id")
    assert rows.column_names == RUNS_SCHEMA.names
    assert rows.column("run_id").to_pylist() == [r.run_id for r in tagged.runs]
    for row, res in zip(rows.to_pylist(), tagged.runs, strict=True):
        m = res.manifest
        for key in (
            "accel_hours_saved",
            "fraction_saved",
            "cost_saved",
            "single_task_accel_s",
            "allocated_fraction_saved_high",
            "decode_cpu_s_saved",
        ):
            assert row[key] == m["savings"][key]
        assert row["n_tasks"] == m["savings"]["tasks"] == 4 and row["method"] == m["savings"]["method"]
        assert (row["ok"], row["error"], row["listed"]) == (N_IMAGES, 1, N_IMAGES + 1)
        assert row["wall_s"] == m["timings"]["wall_s"] and row["images_per_s"] == m["timings"]["images_per_s"]
        assert row["files"] == m["files"] >= 1 and row["bytes"] == m["bytes"] > 0
        assert row["started_at"].isoformat() == m["started_at"] and row["model"] == tagged.model
        assert row["tasks"] == ["garment", "color", "pattern", "badges"]


def test_answers_match_an_independent_pyarrow_read(tagged):
    rows = latest_rows(tagged)
    for task in ("garment", "color", "pattern"):
        sql = f"SELECT {task}, count(*) AS n FROM latest GROUP BY 1"
        got = {r[task]: r["n"] for r in query(tagged.out, sql).to_pylist()}
        want = {v["values"]: v["counts"] for v in pc.value_counts(rows[task]).to_pylist()}
        assert got == want
    assert len({*query(tagged.out, "SELECT DISTINCT garment FROM latest").column(0).to_pylist()}) > 1, "labels vary"
    badge_counts = Counter(b for bs in rows["badges"].to_pylist() for b in bs)
    for badge in ("sale", "logo", "text"):
        n = query(tagged.out, "SELECT count(*) AS n FROM latest WHERE list_contains(badges, ?)", params=[badge])
        assert n.column("n")[0].as_py() == badge_counts[badge]
    for label, n in Counter(rows["garment"].to_pylist()).items():  # filters on latest's string columns
        sql = "SELECT count(*) AS n FROM latest WHERE garment = ? AND model_version <> ''"
        got = query(tagged.out, sql, params=[label])
        assert got.column("n")[0].as_py() == n
    errors = query(tagged.out, "SELECT uri, error FROM predictions WHERE status = 'error'").to_pylist()
    assert {e["uri"] for e in errors} == {str(tagged.root / "cat" / "images" / "bad.jpg")}
    assert all(e["error"].startswith("decode:") for e in errors)


def test_documented_queries_run(tagged, tmp_path, monkeypatch):
    """Every ```sql block of the DuckDB section of docs/queries.md runs against a real output."""
    duckdb_part = DOCS.read_text().split("## Other engines")[0]
    blocks = re.findall(r"```sql\n(.*?)```", duckdb_part, re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)  # the COPY example writes review.parquet
    con = connect(tagged.out)
    for sql in blocks:
        con.sql(sql).fetchall() if not sql.lstrip().startswith("COPY") else con.execute(sql)
    assert (tmp_path / "review.parquet").exists()


def test_files_the_log_does_not_name_are_invisible(tagged, tmp_path):
    """Stray, uncommitted, staged and compacted-away files are not read; a plain Parquet glob reads them.

    The copy sits under a key=value folder, which must not become a column (DuckDB's hive partitioning would add
    one for every such folder in the path)."""
    out = tmp_path / "status=x" / "out"
    shutil.copytree(tagged.out, out)
    columns = connect(str(out)).sql("SELECT * FROM predictions").columns
    assert columns == connect(tagged.out).sql("SELECT * FROM predictions").columns
    history = deltalake.DeltaTable(str(out / "predictions"))
    part = Path(history.file_uris()[0])
    shutil.copy(part, part.parent / "part-stray.parquet")  # a file no commit names (a crashed run's)
    (out / "_staging" / "x").mkdir(parents=True, exist_ok=True)
    shutil.copy(part, out / "_staging" / "x" / "part-00000.parquet")
    both_runs = 2 * (N_IMAGES + 1)
    assert history.optimize.compact()["numFilesRemoved"] >= 2  # same run_date: the two runs' files become one
    glob = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/predictions/**/*.parquet', union_by_name = true)")
    assert glob.fetchall()[0][0] > 2 * both_runs  # the glob reads the stray, the replaced and the new files
    con = connect(str(out))
    assert con.sql("SELECT count(*) FROM predictions").fetchall()[0][0] == both_runs
    assert con.sql("SELECT count(*), count(DISTINCT uri) FROM latest").fetchall()[0] == (N_IMAGES, N_IMAGES)
    assert con.sql("SELECT count(*) FROM predictions WHERE status = 'x'").fetchall()[0][0] == 0
    for f in deltalake.DeltaTable(str(out / "predictions")).file_uris():
        Path(f).unlink()  # committed files deleted behind the log's back: a clear error, not a partial answer
    with pytest.raises(UserError, match="query failed"):
        query(str(out), "SELECT count(*) FROM predictions")


def test_empty_missing_and_v1_outputs(tmp_path):
    (tmp_path / "out").mkdir()
    con = connect(str(tmp_path / "out"))
    assert con.sql("SELECT count(*) FROM predictions").fetchall()[0][0] == 0
    assert con.sql("SELECT count(*) FROM latest").fetchall()[0][0] == 0
    assert {"uri", "status", "embedding", "run_date"} <= set(con.sql("SELECT * FROM predictions").columns)
    assert {"uri", "status", "run_id", "run_date"} <= set(con.sql("SELECT * FROM latest").columns)
    assert "accel_hours_saved" in con.sql("SELECT * FROM runs").columns
    with pytest.raises(UserError, match="does not exist"):
        connect(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no committed runs"):
        similar(str(tmp_path / "out"), uri="x")
    v1 = tmp_path / "v1"
    write_v1_run(v1, "r1", [kit_rows(["/a.jpg"], "r1")], run_date="2024-05-01", finished_at="2024-05-01T00:00:00")
    for call in (lambda: connect(str(v1)), lambda: similar(str(v1), uri="/a.jpg")):
        with pytest.raises(UserError, match=f"v1 output layout.*catalog-tagger migrate --output {v1}"):
            call()
    r = _cli("query", "--output", str(v1), "SELECT 1")
    assert r.returncode == 2 and "catalog-tagger migrate" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_formats_and_bad_sql(tagged, tmp_path):
    sql = "SELECT uri, garment, garment_score, badges FROM latest ORDER BY uri"
    want = query(tagged.out, sql).to_pylist()
    r = _cli("query", "--output", tagged.out, "--format", "csv", sql)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["uri"] for row in rows] == [w["uri"] for w in want]
    assert [row["garment"] for row in rows] == [w["garment"] for w in want]
    assert [float(row["garment_score"]) for row in rows] == pytest.approx([w["garment_score"] for w in want])
    assert [json.loads(row["badges"]) for row in rows] == [w["badges"] for w in want]
    r = _cli("query", "--output", tagged.out, "--format", "json", sql)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == want
    r = _cli("query", "--output", tagged.out, "-f", "parquet", "--out", str(tmp_path / "r.parquet"), sql)
    assert r.returncode == 0, r.stderr
    assert pq.read_table(tmp_path / "r.parquet").to_pylist() == want
    r = _cli("query", "--output", tagged.out, "SELEC uri FROM latest")
    assert r.returncode == 2 and "syntax error" in r.stderr and "Traceback" not in r.stderr
    r = _cli("query", "--output", tagged.out, "SELECT nope FROM latest")
    assert r.returncode == 2 and "nope" in r.stderr


def test_similar_by_uri(tagged):
    target = tagged.cat.images[3]
    res = similar(tagged.out, uri=target, k=5)
    assert len(res) == 5 and res[0]["uri"] == target and res[0]["similarity"] == pytest.approx(1.0)
    sims = [r["similarity"] for r in res]
    assert sims == sorted(sims, reverse=True) and len({r["uri"] for r in res}) == 5
    # labels of each hit are its latest row's
    rows = {r["uri"]: r for r in latest_rows(tagged).to_pylist()}
    assert all(r["garment"] == rows[r["uri"]]["garment"] and r["badges"] == rows[r["uri"]]["badges"] for r in res)
    # the similarities are the cosine of the stored embeddings
    e = {u: np.asarray(rows[u]["embedding"], dtype=np.float64) for u in (target, res[1]["uri"])}
    cos = e[target] @ e[res[1]["uri"]] / np.linalg.norm(e[target]) / np.linalg.norm(e[res[1]["uri"]])
    assert res[1]["similarity"] == pytest.approx(cos, abs=1e-5)
    assert len(similar(tagged.out, uri=target, k=1000)) == N_IMAGES
    with pytest.raises(UserError, match="no ok row"):
        similar(tagged.out, uri=str(tagged.root / "cat" / "images" / "bad.jpg"))
    with pytest.raises(UserError, match="exactly one"):
        similar(tagged.out, uri=target, image=target)


def test_similar_by_image_file(tagged, tmp_path):
    target = tagged.cat.images[5]
    outside = tmp_path / ("copy" + Path(target).suffix)
    shutil.copy(target, outside)
    res = similar(tagged.out, image=str(outside), k=3)
    assert res[0]["uri"] == target and res[0]["similarity"] > 0.999
    r = _cli("similar", "--output", tagged.out, "--image", str(outside), "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["uri"] == target


@pytest.mark.integration
def test_s3_output(tagged, s3_server):
    """The views read an s3:// output through s3fs (moto server), with the job's storage options."""
    import boto3
    import s3fs

    bucket = f"ctq-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**opts)
    local = Path(tagged.out)
    fs.pipe(
        {f"{bucket}/out/{p.relative_to(local).as_posix()}": p.read_bytes() for p in local.rglob("*.*") if p.is_file()}
    )
    got = query(f"s3://{bucket}/out", "SELECT count(*) AS n FROM latest", storage_options=opts)
    assert got.column("n")[0].as_py() == N_IMAGES
    assert (
        similar(f"s3://{bucket}/out", uri=tagged.cat.images[0], k=2, storage_options=opts)[0]["uri"]
        == tagged.cat.images[0]
    )
