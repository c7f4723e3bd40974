"""The tagging job end to end on the shared local Ray: sources, bad images, incremental, commit, schema."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from modelkit import committed_rows

from catalog_tagger.config import load_tasks
from catalog_tagger.query import RUNS_SCHEMA
from catalog_tagger.schema import (
    MANIFEST_VERSION,
    OUTPUT_SCHEMA_VERSION,
    RunCounts,
    RunManifest,
    RunTimings,
    output_schema,
)
from catalog_tagger.synthetic.catalog import SynthConfig, generate, write_bad_images
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag import delta
from catalog_tagger.tag.job import TagJobConfig, run

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=40, seed=7, min_size=300, max_size=420, name="job")


@pytest.fixture(scope="module")
def catalog(kit):
    return kit["synth"]


@pytest.fixture(scope="module")
def model(kit):
    return kit["model"]


def visible_parquet(out: Path) -> list[Path]:
    """The data files a reader of the history table sees: those its Delta log adds (not the folder's files)."""
    table = ledger.Layout(str(out)).history()
    return sorted(out / "predictions" / p for p in delta.data_files(table)) if table is not None else []


def test_local_directory_source_one_row_per_image(catalog, model, tmp_path):
    out = tmp_path / "out"
    res = run(TagJobConfig(model=model, source=catalog.out + "/images", output=str(out), batch_size=16))
    assert res.listed == 40 and res.ok == 40 and res.error == 0
    table = committed_rows(out)
    assert table.num_rows == 40
    assert sorted(table.column("uri").to_pylist()) == sorted(catalog.images)
    # one Delta commit added the run's files (partitioned by run_date), carrying the run id and its manifest
    history = ledger.Layout(str(out)).history()
    assert history.transaction_version(f"catalog-tagger/run/{res.run_id}") == 1
    files = visible_parquet(out)
    assert files and all(p.parent.name.startswith("run_date=") and res.run_id in p.name for p in files)
    manifest = json.loads((out / "runs" / f"{res.run_id}.json").read_text())
    assert manifest == ledger.committed_manifest(ledger.Layout(str(out)), res.run_id)
    assert manifest["files"] == len(files) and manifest["bytes"] == sum(p.stat().st_size for p in files)
    assert manifest["counts"]["ok"] == 40 and manifest["model_version"] == table.column("model_version")[0].as_py()
    assert not (out / "_staging" / res.run_id).exists()
    # width/height are the originals as displayed; labels are from the task config
    truth = pq.read_table(catalog.truth_uri).to_pandas().set_index("uri")
    rows = table.to_pandas().set_index("uri")
    assert (rows["width"] == truth.loc[rows.index, "width"]).all()
    assert (rows["height"] == truth.loc[rows.index, "height"]).all()
    tasks = load_tasks(catalog.tasks_uri)
    assert set(rows["garment"]) <= set(tasks.task("garment").labels)
    assert all(set(b) <= set(tasks.task("badges").labels) for b in rows["badges"])
    assert {len(e) for e in rows["embedding"]} == {32}


def test_golden_output_schema(catalog, model, tmp_path):
    out = tmp_path / "out"
    run(TagJobConfig(model=model, source=catalog.out + "/images", output=str(out), limit=4))
    schema = ledger.Layout(str(out)).history().schema().to_arrow()
    schema = pa.schema(schema)
    golden = [
        ("uri", "string", False),
        ("size", "int64", True),
        ("etag", "string", True),
        ("mtime", "timestamp[us, tz=UTC]", True),
        ("content_hash", "string", True),
        ("run_id", "string", False),
        ("model_version", "string", False),
        ("status", "string", False),
        ("error", "string", True),
        ("width", "int32", True),
        ("height", "int32", True),
        ("garment", "string", True),
        ("garment_score", "float", True),
        ("color", "string", True),
        ("color_score", "float", True),
        ("pattern", "string", True),
        ("pattern_score", "float", True),
        ("badges", "list<element: string>", True),
        ("badges_scores", "list<element: float>", True),
        ("embedding", "list<element: float>", True),  # Delta has no fixed-size list: every row holds 32
        ("tagged_at", "timestamp[us, tz=UTC]", False),
        ("run_date", "date32[day]", True),  # the partition column
    ]
    assert [(f.name, str(f.type), f.nullable) for f in schema] == golden
    assert OUTPUT_SCHEMA_VERSION == 2
    v1 = output_schema(load_tasks(catalog.tasks_uri), 32)
    assert [f.name for f in v1] == [name for name, _, _ in golden[:-1]]
    data_file = pq.read_schema(visible_parquet(out)[0])  # partition values live in the path, not in the file
    assert "run_date" not in data_file.names and data_file.field("embedding").type == schema.field("embedding").type


# The run manifest's keys (runs/<run_id>.json): readers, the docs and the `runs` view rely on them.
GOLDEN_MANIFEST_KEYS = {
    "run_id": None,
    "run_date": None,
    "started_at": None,
    "finished_at": None,
    "model": None,
    "model_version": None,
    "source": None,
    "schema_version": None,
    "incremental": None,
    "tasks": None,
    "counts": {
        "listed", "to_tag", "unchanged", "rows", "ok", "error", "skipped_non_image", "duplicate_uris",
        "skipped_by_reason", "retried_duplicates_dropped", "resumed", "committed_meanwhile_dropped",
    },
    "timings": {
        "wall_s", "list_s", "pipeline_s", "accel_s", "decode_cpu_s", "images_per_s", "ray_init_s", "calibration_s",
        "first_batch_s",
    },
    "resources": {"executor", "actors", "num_gpus", "threads", "decode_on", "write_nodes"},  # the local executor's plan
    "savings": {
        "images", "tasks", "device", "devices", "method", "factor", "factor_low", "factor_high",
        "multi_head_accel_s", "single_task_accel_s", "single_task_accel_s_low", "single_task_accel_s_high",
        "accel_hours_saved", "accel_hours_saved_low", "accel_hours_saved_high", "fraction_saved",
        "fraction_saved_low", "fraction_saved_high", "allocated_accel_s", "single_task_allocated_s",
        "single_task_allocated_s_low", "single_task_allocated_s_high", "allocated_hours_saved",
        "allocated_hours_saved_low", "allocated_hours_saved_high", "allocated_fraction_saved",
        "allocated_fraction_saved_low", "allocated_fraction_saved_high", "price_per_hour", "price_unit",
        "cost_saved", "cost_saved_low", "cost_saved_high", "allocated_cost_saved", "allocated_cost_saved_low",
        "allocated_cost_saved_high", "decode_cpu_s", "decode_cpu_s_saved", "decode_cost_saved", "calibration",
        "notes",
    },
    "notes": None,
    "files": None,  # data files the commit added
    "bytes": None,
    "profile": {"tasks"},  # label distributions and confidence of the committed rows (tag/profile.py)
    "health": {"status", "error_fraction", "max_error_fraction", "warnings", "drift"},  # tag/health.py
    "manifest_version": None,
}  # fmt: skip


def test_golden_run_manifest(catalog, model, tmp_path):
    out = tmp_path / "out"
    res = run(TagJobConfig(model=model, source=catalog.out + "/images", output=str(out), limit=4, executor="local"))
    manifest = json.loads((out / "runs" / f"{res.run_id}.json").read_text())
    assert res.manifest == manifest
    assert set(manifest) == set(GOLDEN_MANIFEST_KEYS)
    for key, inner in GOLDEN_MANIFEST_KEYS.items():
        if inner is None:
            assert not isinstance(manifest[key], dict | list) or key in ("tasks", "notes"), key
            continue
        assert set(manifest[key]) == inner, key
    assert manifest["manifest_version"] == MANIFEST_VERSION and manifest["schema_version"] == OUTPUT_SCHEMA_VERSION
    assert (manifest["counts"]["resumed"], manifest["counts"]["committed_meanwhile_dropped"]) == (0, 0)
    # the model and the manifest agree, and every count and timing is a column of the `runs` view
    assert set(GOLDEN_MANIFEST_KEYS) == {f.name for f in dataclasses.fields(RunManifest)}
    assert GOLDEN_MANIFEST_KEYS["counts"] == {f.name for f in dataclasses.fields(RunCounts)}
    assert GOLDEN_MANIFEST_KEYS["timings"] == {f.name for f in dataclasses.fields(RunTimings)}
    assert GOLDEN_MANIFEST_KEYS["counts"] | GOLDEN_MANIFEST_KEYS["timings"] <= set(RUNS_SCHEMA.names)


def test_bad_images_become_rows_and_never_crash(model, tmp_path):
    src = tmp_path / "bad"
    expected = write_bad_images(src)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", "tag", "--model", model, "--source", str(src),
         "--output", str(out), "--batch-size", "4", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # committed, but far over the default 5% error budget: exit 3 with the count named (one line)
    assert proc.returncode == 3, proc.stderr[-3000:]
    n_bad = sum(v == "error" for v in expected.values())
    assert f"{n_bad} of {len(expected)} images" in proc.stderr and "5.0% error budget" in proc.stderr
    table = committed_rows(out)
    assert table.num_rows == len(expected)
    got = {
        Path(u).name: (s, e)
        for u, s, e in zip(*(table.column(c).to_pylist() for c in ("uri", "status", "error")), strict=True)
    }
    assert {k: v[0] for k, v in got.items()} == expected
    for name, (status, err) in got.items():
        assert (err is None) == (status == "ok"), name
    assert "pixels" in got["bomb.png"][1] and "empty" in got["empty.jpg"][1]
    assert "tagged ok" in proc.stdout and "errors" in proc.stdout


def test_incremental_nightly(catalog, model, tmp_path):
    work = tmp_path / "catalog"
    shutil.copytree(catalog.out, work)
    out = str(tmp_path / "out")
    cfg = dict(model=model, source=str(work / "images"), output=out, batch_size=16)
    first = run(TagJobConfig(**cfg))
    assert first.processed == 40
    second = run(TagJobConfig(**cfg))
    assert second.processed == 0 and second.unchanged == 40 and second.manifest is None
    generate(SynthConfig(out=str(work), images=10, seed=7, start=1000, min_size=300, max_size=420))
    third = run(TagJobConfig(**cfg))
    assert third.processed == 10 and third.unchanged == 40
    # a changed file (new bytes, new size/mtime) is re-tagged
    victim = sorted((work / "images").iterdir())[0]
    victim.write_bytes((work / "images" / sorted(p.name for p in (work / "images").iterdir())[1]).read_bytes())
    fourth = run(TagJobConfig(**cfg))
    assert fourth.processed == 1
    full = run(TagJobConfig(**cfg, full=True))
    assert full.processed == 50
    rows = committed_rows(out)
    assert rows.num_rows == 40 + 10 + 1 + 50
    # DuckDB reads exactly the committed files (through the log); latest holds one row per image
    con = duckdb.connect()
    con.register("history", ledger.Layout(out).history().to_pyarrow_dataset())
    assert con.execute("SELECT count(DISTINCT uri) FROM history WHERE status = 'ok'").fetchone()[0] == 50
    latest = DeltaTable(str(tmp_path / "out" / "latest")).to_pyarrow_table()
    assert latest.num_rows == 50 and len(set(latest.column("uri").to_pylist())) == 50
    assert set(latest.column("run_id").to_pylist()) == {full.run_id}


def test_new_model_version_retags_everything(catalog, tiny_model_factory, tmp_path):
    out = str(tmp_path / "out")
    src = catalog.out + "/images"
    m1 = tiny_model_factory(catalog.tasks_uri, seed=1)
    m2 = tiny_model_factory(catalog.tasks_uri, seed=2)
    assert run(TagJobConfig(model=m1, source=src, output=out, limit=8)).processed == 8
    assert run(TagJobConfig(model=m1, source=src, output=out, limit=8)).processed == 0
    assert run(TagJobConfig(model=m2, source=src, output=out, limit=8)).processed == 8


def test_manifest_source_with_duplicates_and_relative_uris(catalog, model, tmp_path):
    images = sorted(Path(catalog.out, "images").iterdir())[:6]
    manifest = tmp_path / "manifest.csv"
    extra = sorted(Path(catalog.out, "images").iterdir())[6]
    relative = os.path.relpath(extra, tmp_path)  # relative to the manifest's folder
    lines = ["uri"] + [str(p) for p in images] + [str(images[0]), relative]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    res = run(TagJobConfig(model=model, source=str(manifest), output=str(out)))
    assert res.processed == 7  # 6 absolute + 1 relative (different file), duplicate tagged once
    assert res.manifest["counts"]["duplicate_uris"] == 1
    uris = committed_rows(out).column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == 7


def test_crash_before_commit_leaves_nothing_visible_and_rerun_resumes(catalog, model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = TagJobConfig(model=model, source=catalog.out + "/images", output=str(out), run_id="crashy", rows_per_shard=10)

    def boom(*_args, **_kwargs):
        raise RuntimeError("simulated crash before commit")

    monkeypatch.setattr(ledger, "commit", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, progress=None)
    assert visible_parquet(out) == [] and committed_rows(out).num_rows == 0
    assert not (out / "runs").exists() or list((out / "runs").iterdir()) == []
    written = sorted((out / "predictions").rglob("part-crashy-*.parquet"))
    assert len(written) == 4  # 40 rows in files of 10, written but in no commit: invisible to readers
    assert len(sorted((out / "_staging" / "crashy" / "files").glob("*.json"))) == 4  # each with its sidecar
    monkeypatch.undo()
    res = run(cfg)
    assert res.manifest is not None and res.ok == 40
    assert "resumed" in " ".join(res.notes)
    table = committed_rows(out)
    assert table.num_rows == 40 and len(set(table.column("uri").to_pylist())) == 40


def test_bad_command_input_exits_2_before_any_work(catalog, model, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "catalog_tagger.cli", "tag", *args], capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    out = tmp_path / "out"
    r = cli("--model", str(tmp_path / "nope"), "--source", catalog.out, "--output", str(out))
    assert r.returncode == 2 and "not a model artifact" in r.stderr
    r = cli("--model", model, "--source", str(tmp_path / "missing"), "--output", str(out))
    assert r.returncode == 2 and "does not exist" in r.stderr
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    r = cli("--model", model, "--source", catalog.out, "--output", str(ro / "sub"))
    assert r.returncode == 2 and "not writable" in r.stderr
    assert not out.exists()


def test_s3_source_and_output_through_moto(catalog, model, s3_bucket):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    images = sorted(Path(catalog.out, "images").iterdir())[:12]
    for p in images:
        fs.put_file(str(p), f"{bucket}/catalog/sub dir/{p.name}")
    fs.pipe_file(f"{bucket}/catalog/readme.txt", b"not an image")
    out = f"s3://{bucket}/tags"
    cfg = TagJobConfig(model=model, source=f"s3://{bucket}/catalog", output=out, storage_options=opts, batch_size=8)
    res = run(cfg)
    assert res.ok == 12 and res.manifest["counts"]["skipped_non_image"] == 1
    runs = fs.ls(f"{bucket}/tags/runs")
    assert len(runs) == 1
    history = ledger.Layout(out, opts).history()
    assert history.transaction_version(f"catalog-tagger/run/{res.run_id}") == 1
    assert all(f.startswith("run_date=") for f in delta.data_files(history))
    table = committed_rows(out, opts)
    assert table.num_rows == 12
    assert all(u.startswith(f"s3://{bucket}/catalog/sub dir/") for u in table.column("uri").to_pylist())
    assert all(e for e in table.column("etag").to_pylist())  # S3 gives etags: the identity for the next night
    assert run(cfg).processed == 0
