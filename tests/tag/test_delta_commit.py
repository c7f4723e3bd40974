"""The Delta output's guarantees: a reader sees all of a run or none of it (also across SIGKILLs), each image is
committed once (crash -> takeover -> resume; at-least-once repeats), a committed run id is never committed twice,
and a model with other tasks is refused unless asked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from modelkit import committed_rows

from catalog_tagger.errors import UserError
from catalog_tagger.tag import delta, writer
from catalog_tagger.tag.commit import Layout
from catalog_tagger.tag.dedup import drop_duplicates
from catalog_tagger.tag.job import ALREADY_COMMITTED, TagJobConfig, run

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES = 24
CLI = [sys.executable, "-m", "catalog_tagger.cli", "tag"]


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=N_IMAGES, seed=3, min_size=64, max_size=96, name="deltacommit")


def _run_rows(output: str, run_id: str, opts: dict[str, str] | None) -> int:
    """Rows of ``run_id`` a reader of the history table sees now (through the log; 0 before the table exists)."""
    table = delta.open_table(delta.table_uri(output, "predictions"), delta.delta_options(output, opts))
    if table is None:
        return 0
    import pyarrow.compute as pc

    return int(table.to_pyarrow_dataset().count_rows(filter=pc.field("run_id") == run_id))


def _kill_when(
    cmd: list[str], env: dict[str, str], ready: Callable[[], bool], seen: Callable[[], int], timeout: float = 240
) -> tuple[list[int], bool]:
    """Run ``cmd``; poll ``seen()`` (what a reader sees) until ``ready()``, then SIGKILL the process group.
    Returns every count the reader saw and whether the kill happened (False: the process ended first)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    counts: list[int] = []
    deadline = time.monotonic() + timeout
    killed = False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            counts.append(seen())
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    counts.append(seen())
    return counts, killed


def _sigkill_sequence(kit, output: str, env: dict[str, str], opts, points: dict[str, Callable[[], bool]]) -> None:
    """Kill the same run at each point in turn, then let it finish: a reader polling the table throughout sees
    0 rows of the run or all of them, never a part; the finished run holds every image once."""
    run_id = "killed"
    cmd = [*CLI, "--model", kit["model"], "--source", kit["source"], "--output", output, "--run-id", run_id,
           "--rows-per-shard", "4", "--batch-size", "4", "--executor", "local", "--device", "cpu"]  # fmt: skip
    seen_all: list[int] = []
    for name, ready in points.items():
        counts, killed = _kill_when(cmd, env, ready, lambda: _run_rows(output, run_id, opts))
        seen_all += counts
        assert killed or counts[-1] == N_IMAGES, f"{name}: the run ended without reaching the point"
    counts, _ = _kill_when(cmd, env, lambda: False, lambda: _run_rows(output, run_id, opts))
    seen_all += counts
    assert set(seen_all) <= {0, N_IMAGES}, f"a reader saw part of a run: {sorted(set(seen_all))}"
    assert seen_all[-1] == N_IMAGES
    rows = committed_rows(output, opts)
    assert rows.num_rows == N_IMAGES and len(set(rows.column("uri").to_pylist())) == N_IMAGES
    commits = [h for h in DeltaTable(delta.table_uri(output, "predictions"), storage_options=delta.delta_options(
        output, opts)).history() if h.get(delta.RUN_ID_KEY) == run_id]  # fmt: skip
    assert len(commits) == 1


@pytest.mark.slow
def test_reader_sees_all_or_none_across_sigkills_local(kit, tmp_path):
    out = tmp_path / "out"
    table = out / "predictions"

    def files_written() -> bool:  # mid-run: some data files of the run exist, no commit yet
        return len(list(table.glob("run_date=*/part-killed-*.parquet"))) >= 2

    def commit_lock_held() -> bool:  # in the commit phase (dedup check, Delta commit)
        return (out / "_locks" / "commit.lock").exists()

    def committed() -> bool:  # after the Delta commit, before latest and the cleanup
        return (table / "_delta_log" / "00000000000000000001.json").exists()

    points = {"files": files_written, "lock": commit_lock_held, "committed": committed}
    _sigkill_sequence(kit, str(out), dict(os.environ), None, points)
    assert not (out / "_staging" / "killed").exists()
    latest = DeltaTable(str(out / "latest")).to_pyarrow_table()
    assert latest.num_rows == N_IMAGES  # the merge a kill skipped was caught up


@pytest.mark.slow
@pytest.mark.integration
def test_reader_sees_all_or_none_across_sigkills_s3(kit, s3_server, s3_bucket):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    output = f"s3://{bucket}/tags"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": opts["key"],
           "AWS_SECRET_ACCESS_KEY": opts["secret"], "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def files_written() -> bool:
        fs.invalidate_cache()
        return len(fs.glob(f"{bucket}/tags/predictions/run_date=*/part-killed-*.parquet")) >= 2

    def committed() -> bool:
        fs.invalidate_cache()
        return fs.exists(f"{bucket}/tags/predictions/_delta_log/00000000000000000001.json")

    _sigkill_sequence(kit, output, env, opts, {"files": files_written, "committed": committed})


def test_crash_takeover_resume_commits_each_image_once(kit, tmp_path):
    """Run A is SIGKILLed holding the commit lock; run B (a new id) takes the stale lock over and commits the same
    images; rerunning A then commits nothing twice (the bug of the v1 layout: 2x rows)."""
    out = str(tmp_path / "out")
    script = textwrap.dedent(
        f"""
        import os, signal
        from catalog_tagger.tag import commit
        from catalog_tagger.tag.job import TagJobConfig, run
        commit.commit = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock
        run(TagJobConfig(model={kit["model"]!r}, source={kit["source"]!r}, output={out!r}, run_id="run-a",
                         executor="local", rows_per_shard=5))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (Path(out) / "_locks" / "commit.lock").exists()  # left behind by the killed run
    cfg = {"model": kit["model"], "source": kit["source"], "output": out, "executor": "local"}
    b = run(TagJobConfig(**cfg, run_id="run-b"))
    assert b.ok == N_IMAGES
    a = run(TagJobConfig(**cfg, run_id="run-a", rows_per_shard=5))
    assert a.manifest is None and "committed meanwhile by run-b" in a.notes[-1]
    rows = committed_rows(out)
    assert rows.num_rows == N_IMAGES and set(rows.column("run_id").to_pylist()) == {"run-b"}
    assert not (Path(out) / "_staging" / "run-a").exists()


def test_rerun_of_a_committed_run_id_is_a_no_op(kit, tmp_path):
    cfg = TagJobConfig(model=kit["model"], source=kit["source"], output=str(tmp_path / "out"), run_id="once",
                       executor="local", limit=6)  # fmt: skip
    first = run(cfg)
    version = Layout(cfg.output).history().version()
    again = run(cfg)
    assert again.notes == [ALREADY_COMMITTED] and again.manifest == first.manifest
    assert Layout(cfg.output).history().version() == version
    assert committed_rows(cfg.output).num_rows == 6


def _rows(uris: list[str], run_id: str, schema: pa.Schema) -> pa.Table:
    import datetime as dt

    n = len(uris)
    now = dt.datetime.now(dt.UTC)
    cols = {"uri": uris, "run_id": [run_id] * n, "model_version": ["m1"] * n, "status": ["ok"] * n,
            "tagged_at": [now] * n, "size": [10] * n, "etag": ["e"] * n}  # fmt: skip
    return pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in schema})


def test_repeated_rows_across_files_are_committed_once(tmp_path, kit):
    """Ray Data is at-least-once: the same image may reach two write tasks. The check before the commit drops
    the repeat, so the run commits each image once."""
    from catalog_tagger.config import load_tasks

    out = str(tmp_path / "out")
    schema = delta.predictions_schema(load_tasks(kit["synth"].tasks_uri), 4)
    table = delta.ensure_table(delta.table_uri(out, "predictions"), schema, None, partition_by=["run_date"])
    part = writer.PartWriter(out, "r1", "2026-11-29", None, delta.file_schema(schema))
    timing = {"accel_s": 1.0, "decode_s": 0.5}
    files = [
        part.write(_rows(["a", "b", "c"], "r1", schema), timing),
        part.write(_rows(["c", "d"], "r1", schema), timing),
    ]
    dropped = drop_duplicates(part, table, files, known_version=table.version(), model_version="m1")
    assert dropped.repeats == 1 and dropped.meanwhile == 0
    assert sorted(f.rows for f in dropped.files) == [1, 3]
    assert writer.staged_files(out, "r1", None) == sorted(dropped.files, key=lambda f: f.path.rsplit("/", 1)[-1])
    again = drop_duplicates(part, table, dropped.files, known_version=table.version(), model_version="m1")
    assert again.files == dropped.files and again.repeats == 0  # idempotent


def test_another_task_set_is_refused_unless_allowed(kit, tmp_path, tiny_model_factory):
    import pyarrow.compute as pc
    import yaml

    out = str(tmp_path / "out")
    first = run(TagJobConfig(model=kit["model"], source=kit["source"], output=out, executor="local", limit=4))
    doc = yaml.safe_load(Path(kit["tasks"]).read_text())
    doc["tasks"] = [t for t in doc["tasks"] if t["name"] != "garment"]
    fewer = tmp_path / "tasks-fewer.yaml"
    fewer.write_text(yaml.safe_dump(doc))
    cfg = {"model": tiny_model_factory(str(fewer)), "source": kit["source"], "output": out, "executor": "local"}
    with pytest.raises(UserError, match=r"tasks differ.*garment.*--allow-task-change"):
        run(TagJobConfig(**cfg, limit=6))
    assert committed_rows(out).num_rows == 4  # refused before any work
    res = run(TagJobConfig(**cfg, limit=6, allow_task_change=True))
    assert res.ok == 6
    rows = committed_rows(out)
    old, new = (rows.filter(pc.equal(rows["run_id"], r)) for r in (first.run_id, res.run_id))
    assert old.num_rows == 4 and old["garment"].null_count == 0  # older rows keep their labels: never a silent NULL
    assert new.num_rows == 6 and new["garment"].null_count == 6  # the new model has no garment task (documented)
    assert new["color"].null_count == 0


def test_a_data_file_name_depends_on_its_uris_only():
    """A retried write task must land on the same file: the name hashes the values, not how Arrow holds them."""
    parent = pa.array(["/a.jpg", "/bb.jpg", "/ccc.jpg", "/d.jpg"])
    name = writer.file_name("r", pa.chunked_array([pa.array(["/bb.jpg", "/ccc.jpg"])]))
    assert writer.file_name("r", pa.chunked_array([parent.slice(1, 2)])) == name  # a slice of a bigger batch
    assert writer.file_name("r", pa.chunked_array([parent.slice(1, 1), parent.slice(2, 1)])) == name  # chunked
    assert writer.file_name("r", pa.chunked_array([pa.array(["/bb.jpg/", "ccc.jpg"])])) != name  # same characters
    assert writer.file_name("other", pa.chunked_array([parent.slice(1, 2)])) != name
