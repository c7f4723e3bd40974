"""Faults and hostile inputs: killed actors and drivers, flaky and unwritable object storage, concurrent runs.

Every fault test asserts exactly one committed row per input image and the same predictions as a clean run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest
from faultproxy import Burst, DenyWritesAfter, EveryNth, FaultProxy
from modelkit import committed_rows

from catalog_tagger.config import load_tasks
from catalog_tagger.errors import CommitLockLost, CommitLockTimeout, OutputWriteError
from catalog_tagger.storage import filesystem, retry_transient, write_bytes_atomic
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag import delta, lock
from catalog_tagger.tag.job import TagJobConfig, run
from catalog_tagger.tag.predictor import ENV_BATCH_DELAY_S, ENV_KILL_AT_BATCH, ENV_KILL_MARKER

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES = 24


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=N_IMAGES, seed=11, min_size=300, max_size=400, name="faults")


@pytest.fixture(scope="module")
def catalog(kit):
    return kit["synth"]


@pytest.fixture(scope="module")
def images(kit) -> str:
    return kit["source"]


@pytest.fixture(scope="module")
def model(kit) -> str:
    return kit["model"]


@pytest.fixture(scope="module")
def clean(images, model, tmp_path_factory) -> dict[str, dict]:
    """A clean run's rows by file name: what every faulty run must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    res = run(TagJobConfig(model=model, source=images, output=str(out), batch_size=8))
    assert res.ok == N_IMAGES
    return by_name(committed_rows(str(out)))


# --------------------------------------------------------------------------------------------- helpers
def by_name(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    names = [r["uri"].rsplit("/", 1)[-1] for r in rows]
    assert len(names) == len(set(names)), "an image was committed more than once"
    return dict(zip(names, rows, strict=True))


def assert_same_as_clean(table: pa.Table, clean: dict[str, dict], tasks_uri: str, *, only: set[str] | None = None):
    """Exactly one row per input image, and the clean run's labels, scores and embeddings (allclose)."""
    got = by_name(table)
    want = {k: v for k, v in clean.items() if only is None or k in only}
    assert sorted(got) == sorted(want)
    for name, row in got.items():
        ref = want[name]
        assert row["status"] == "ok", (name, row["error"])
        for task in load_tasks(tasks_uri).tasks:
            assert row[task.name] == ref[task.name], (name, task.name)
            score = f"{task.name}_score" if task.kind == "multiclass" else f"{task.name}_scores"
            np.testing.assert_allclose(row[score], ref[score], rtol=1e-4, atol=1e-5, err_msg=f"{name} {score}")
        np.testing.assert_allclose(row["embedding"], ref["embedding"], rtol=1e-4, atol=1e-5, err_msg=name)


def visible_files(out: Path) -> list[str]:
    """What a reader sees: the data files the history table's log adds, and the runs/ copies of manifests."""
    table = ledger.Layout(str(out)).history()
    files = [] if table is None else delta.data_files(table)
    return sorted(files) + sorted(p.name for p in (out / "runs").glob("*.json"))


def sidecars(staging: Path) -> list[Path]:
    """The sidecars of a run's whole data files (``writer.py``)."""
    return sorted(p for p in (staging / "files").glob("part-*.json") if p.is_file())


def make_bucket(endpoint: str) -> tuple[str, dict]:
    """A fresh bucket on moto, and direct (fault-free) storage options for checking what landed."""
    import uuid

    import boto3

    bucket = f"ct-{uuid.uuid4().hex[:10]}"
    opts = {"key": "testing-key", "secret": "testing-secret", "client_kwargs": {"endpoint_url": endpoint}}
    opts["client_kwargs"]["region_name"] = "us-east-1"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    ).create_bucket(Bucket=bucket)
    return bucket, opts


def upload(images: str, bucket: str, opts: dict, prefix: str = "catalog") -> None:
    fs = filesystem("s3://", opts)
    for p in sorted(Path(images).iterdir()):
        fs.put_file(str(p), f"{bucket}/{prefix}/{p.name}")


def via(proxy: FaultProxy, opts: dict, **extra) -> dict:
    """Storage options that reach moto through ``proxy``."""
    return {**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": proxy.endpoint}, **extra}


# --------------------------------------------------------------------------------------------- 1. actor killed
@pytest.mark.slow
def test_predictor_actor_killed_mid_run_is_restarted_and_batch_retried(
    images, model, clean, catalog, tmp_path, monkeypatch
):
    marker = tmp_path / "actor-killed"
    # Read by the driver and handed to the actor's constructor (the shared Ray's workers never see this env).
    monkeypatch.setenv(ENV_KILL_AT_BATCH, "2")
    monkeypatch.setenv(ENV_KILL_MARKER, str(marker))
    out = tmp_path / "out"
    cfg = TagJobConfig(model=model, source=images, output=str(out), batch_size=4, rows_per_shard=8, executor="ray")
    res = run(cfg)
    assert marker.exists(), "the fault was not injected: the actor never reached batch 2"
    assert res.ok == N_IMAGES and res.error == 0 and res.manifest is not None
    assert_same_as_clean(committed_rows(str(out)), clean, catalog.tasks_uri)


# --------------------------------------------------------------------------------------------- 2. driver killed
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI's whole process group (its own local Ray included) and make sure nothing survives."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:  # Ray processes outside the group: reap them, then fail loudly
        p.kill()
    assert not alive, f"processes outlived the killed driver: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_driver_sigkill_mid_run_then_rerun_resumes_from_staged_shards(images, model, clean, catalog, tmp_path):
    out = tmp_path / "out"
    run_id = "killed-driver"
    staging = out / "_staging" / run_id
    cmd = [sys.executable, "-m", "catalog_tagger.cli", "tag", "--model", model, "--source", images,
           "--output", str(out), "--run-id", run_id, "--batch-size", "4", "--rows-per-shard", "4",
           "--device", "cpu", "--executor", "ray"]  # fmt: skip
    # Slow each batch down so that the kill lands mid-run, after the first shards are staged.
    env = {**os.environ, ENV_BATCH_DELAY_S: "0.5"}
    log_path = tmp_path / "cli.log"
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(cmd, env=env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not sidecars(staging):
                assert proc.poll() is None, f"the CLI ended before staging a shard:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no shard staged in 180 s"
                time.sleep(0.02)
        finally:
            _kill_group(proc)
    staged = sidecars(staging)
    written = sum(json.loads(p.read_text())["rows"] for p in staged)
    assert 1 <= written < N_IMAGES, "the kill should land mid-run"
    assert visible_files(out) == [], "a killed run must leave nothing a reader sees"

    res = run(TagJobConfig(model=model, source=images, output=str(out), run_id=run_id, batch_size=4, rows_per_shard=4))
    assert res.resumed == written, "every whole data file is resumed, none re-tagged"
    assert res.resumed < N_IMAGES and res.manifest["counts"]["resumed"] == res.resumed
    assert res.ok == N_IMAGES
    # at most rows_per_shard rows per data file
    assert res.manifest["files"] >= N_IMAGES // 4
    assert_same_as_clean(committed_rows(str(out)), clean, catalog.tasks_uri)
    assert not staging.exists()


# --------------------------------------------------------------------------------------------- 3. flaky S3
@pytest.mark.integration
@pytest.mark.slow
def test_transient_s3_errors_on_reads_and_writes_are_retried(images, model, clean, catalog, s3_server, caplog):
    bucket, direct = make_bucket(s3_server)
    upload(images, bucket, direct)
    first_image = sorted(Path(images).iterdir())[0].name
    rules = [
        # Bursts that outlast s3fs's own retries (5 tries, botocore retries off below): only ours can save these.
        Burst("GET", lambda p: p.endswith(f"/catalog/{first_image}"), count=6, kind="503"),
        Burst("PUT", lambda p: "/files/part-" in p and p.endswith(".json"), count=6, kind="reset"),
        # And a steady drizzle of 503 SlowDown / dropped connections / lost answers on every GET and PUT.
        EveryNth(4, methods=("GET", "PUT"), kinds=("503", "reset", "reset_after")),
    ]
    with FaultProxy(s3_server, rules) as proxy:
        opts = via(proxy, direct, config_kwargs={"retries": {"max_attempts": 1}})
        cfg = TagJobConfig(model=model, source=f"s3://{bucket}/catalog", output=f"s3://{bucket}/tags",
                           storage_options=opts, batch_size=4, rows_per_shard=8)  # fmt: skip
        res = run(cfg)
        injected, by_path = proxy.injected, proxy.by_path
    for kind in ("503", "reset", "reset_after"):
        assert injected[("GET", kind)] > 0 and injected[("PUT", kind)] > 0, (kind, injected)
    # The bursts outlasted s3fs (5 tries each): our own retry layer made the 7th request, for the read and for
    # a data file's sidecar.
    assert by_path[("GET", f"/{bucket}/catalog/{first_image}")] >= 7
    assert any(
        "/files/part-" in r.getMessage() and "failed" in r.getMessage() and "retry" in r.getMessage()
        for r in caplog.records
    )
    assert res.ok == N_IMAGES and res.error == 0
    assert res.manifest["counts"]["rows"] == N_IMAGES
    assert_same_as_clean(committed_rows(f"s3://{bucket}/tags", direct), clean, catalog.tasks_uri)
    fs = filesystem("s3://", direct)
    assert not fs.exists(f"{bucket}/tags/_staging/{res.run_id}") and not fs.exists(f"{bucket}/tags/_locks/commit.lock")


def test_our_write_retries_transient_errors_but_not_permanent_ones(tmp_path, caplog):
    import errno

    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise OSError(errno.EBUSY, "SlowDown: Please reduce your request rate.")
        return "done"

    assert retry_transient(flaky, "flaky", delay=0.001) == "done" and calls["n"] == 3

    def denied() -> None:
        calls["n"] += 1
        raise PermissionError("Access Denied")

    calls["n"] = 0
    with pytest.raises(PermissionError):
        retry_transient(denied, "denied", delay=0.001)
    assert calls["n"] == 1
    # a local write into a path that cannot be a folder fails at once, without retries
    (tmp_path / "file").write_text("x")
    caplog.clear()
    with pytest.raises((FileExistsError, NotADirectoryError)):
        write_bytes_atomic(str(tmp_path / "file" / "sub.json"), b"{}")
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


# --------------------------------------------------------------------------------------------- 4. unwritable output
@pytest.mark.integration
@pytest.mark.slow
def test_s3_output_unwritable_mid_run_fails_clearly_then_rerun_succeeds(images, model, clean, catalog, s3_server):
    bucket, direct = make_bucket(s3_server)
    deny = DenyWritesAfter(lambda m, p: m == "PUT" and "/lost-write-access/files/part-" in p, prefix=f"/{bucket}/tags/")
    with FaultProxy(s3_server, [deny]) as proxy:
        cfg = TagJobConfig(model=model, source=images, output=f"s3://{bucket}/tags", storage_options=via(proxy, direct),
                           run_id="lost-write-access", batch_size=4, rows_per_shard=4)  # fmt: skip
        with pytest.raises(OutputWriteError) as exc:
            run(cfg)
        msg = str(exc.value)
        assert "cannot write to output s3://" in msg and "Access Denied" in msg, msg
        assert "--run-id lost-write-access" in msg, msg
        fs = filesystem("s3://", direct)
        fs.invalidate_cache()
        assert committed_rows(f"s3://{bucket}/tags", direct).num_rows == 0 and fs.find(f"{bucket}/tags/runs") == []
        assert len(fs.glob(f"{bucket}/tags/_staging/lost-write-access/files/part-*.json")) == 1
        proxy.heal()
        res = run(cfg)
    assert res.resumed == 4 and res.ok == N_IMAGES
    assert_same_as_clean(committed_rows(f"s3://{bucket}/tags", direct), clean, catalog.tasks_uri)


def test_local_output_unwritable_mid_run_fails_clearly_then_rerun_succeeds(images, model, clean, catalog, tmp_path):
    # Tests run as root, so chmod cannot make a folder read-only: block the second data file's sidecar with a
    # folder in its place (its name is the hash of its uris: the 4 images after the first 4, sorted).
    from catalog_tagger.tag.writer import file_name

    out = tmp_path / "out"
    second = sorted(str(p) for p in Path(images).iterdir())[4:8]
    blocker = out / "_staging" / "blocked" / "files" / f"{file_name('blocked', pa.chunked_array([second]))}.json"
    blocker.mkdir(parents=True)
    cfg = TagJobConfig(model=model, source=images, output=str(out), run_id="blocked", batch_size=4, rows_per_shard=4)
    with pytest.raises(OutputWriteError, match=r"IsADirectoryError.*rerun with --run-id blocked"):
        run(cfg)
    assert visible_files(out) == []
    assert len(sidecars(out / "_staging" / "blocked")) == 1
    blocker.rmdir()
    res = run(cfg)
    assert res.resumed == 4 and res.ok == N_IMAGES
    assert_same_as_clean(committed_rows(str(out)), clean, catalog.tasks_uri)


# --------------------------------------------------------------------------------------------- concurrent runs
def _manifest(path: Path, uris: list[str]) -> str:
    path.write_text("uri\n" + "\n".join(uris) + "\n")
    return str(path)


@pytest.mark.slow
def test_two_runs_planned_at_once_commit_each_image_once(images, model, clean, catalog, tmp_path, monkeypatch):
    """A plans images 0-15; B plans 8-23 before A commits and commits first; A then drops 8-15 under the lock."""
    files = sorted(str(p) for p in Path(images).iterdir())
    out = str(tmp_path / "out")
    cfg_a = TagJobConfig(model=model, source=_manifest(tmp_path / "a.csv", files[:16]), output=out, run_id="run-a",
                         batch_size=8, rows_per_shard=5)  # fmt: skip
    cfg_b = TagJobConfig(model=model, source=_manifest(tmp_path / "b.csv", files[8:]), output=out, run_id="run-b",
                         batch_size=8)  # fmt: skip
    real_lock = lock.commit_lock
    results = {}

    @contextmanager
    def b_commits_first(layout, run_id, **kw):
        if run_id == "run-a" and "b" not in results:
            results["b"] = run(cfg_b)  # B starts after A planned and commits before A takes the lock
        with real_lock(layout, run_id, **kw) as held:
            yield held

    monkeypatch.setattr(lock, "commit_lock", b_commits_first)
    res_a = run(cfg_a)
    res_b = results["b"]
    assert res_b.ok == 16 and res_b.resumed == 0
    assert res_a.ok == 8 and res_a.manifest["counts"]["committed_meanwhile_dropped"] == 8
    assert any("run-b" in n for n in res_a.notes)
    assert_same_as_clean(committed_rows(out), clean, catalog.tasks_uri)
    # a third run of the union finds nothing new
    monkeypatch.setattr(lock, "commit_lock", real_lock)
    assert run(TagJobConfig(model=model, source=images, output=out)).processed == 0


@pytest.mark.slow
def test_run_whose_images_were_all_committed_meanwhile_commits_nothing(images, model, tmp_path, monkeypatch):
    files = sorted(str(p) for p in Path(images).iterdir())[:4]
    out = tmp_path / "out"
    source = _manifest(tmp_path / "m.csv", files)
    real_lock = lock.commit_lock
    other = {}

    @contextmanager
    def other_commits_first(layout, run_id, **kw):
        if run_id == "late" and not other:
            other["res"] = run(TagJobConfig(model=model, source=source, output=str(out), run_id="early"))
        with real_lock(layout, run_id, **kw) as held:
            yield held

    monkeypatch.setattr(lock, "commit_lock", other_commits_first)
    late = run(TagJobConfig(model=model, source=source, output=str(out), run_id="late"))
    assert other["res"].ok == 4
    assert late.manifest is None and late.ok == 0
    assert any("committed meanwhile by early" in n for n in late.notes), late.notes
    assert [p.name for p in (out / "runs").iterdir()] == ["early.json"]
    assert [r.run_id for r in delta.all_runs(ledger.Layout(str(out)).history())] == ["early"]
    assert not (out / "_staging" / "late").exists() and not (out / "_locks" / "commit.lock").exists()
    assert committed_rows(str(out)).num_rows == 4


@pytest.mark.slow
def test_two_cli_runs_started_at_once_commit_each_image_once(images, model, clean, catalog, tmp_path):
    files = sorted(str(p) for p in Path(images).iterdir())
    out = tmp_path / "out"
    procs = []
    for name, part in (("a", files[:16]), ("b", files[8:])):
        cmd = [sys.executable, "-m", "catalog_tagger.cli", "tag", "--model", model, "--output", str(out),
               "--source", _manifest(tmp_path / f"{name}.csv", part), "--run-id", f"cli-{name}",
               "--batch-size", "8", "--device", "cpu"]  # fmt: skip
        log_fh = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True), log_fh))
    try:
        for proc, _ in procs:
            proc.wait(timeout=300)
    finally:
        for proc, log_fh in procs:
            if proc.poll() is None:
                _kill_group(proc)
            log_fh.close()
    for (proc, _), name in zip(procs, "ab", strict=True):
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    assert_same_as_clean(committed_rows(str(out)), clean, catalog.tasks_uri)
    manifests = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert sum(m["counts"]["rows"] for m in manifests) == N_IMAGES
    # The 8 shared images were resolved once: by the later run's diff (if it planned after the first committed)
    # or under the commit lock (if both planned first); timing decides which, never the outcome.
    assert sum(m["counts"]["unchanged"] + m["counts"]["committed_meanwhile_dropped"] for m in manifests) == 8
    assert not (out / "_locks" / "commit.lock").exists() and not list((out / "_staging").glob("cli-*"))


# --------------------------------------------------------------------------------------------- the commit lock
def test_commit_lock_excludes_waits_and_times_out_clearly(tmp_path):
    layout = ledger.Layout(str(tmp_path / "out"))
    first = lock.acquire_commit_lock(layout, "first")
    with pytest.raises(CommitLockTimeout, match=r"held by run first .*Rerun later with the same run id"):
        lock.acquire_commit_lock(layout, "second", wait_s=0.3)
    got = {}

    def second() -> None:
        got["lock"] = lock.acquire_commit_lock(layout, "second", wait_s=30, poll_s=0.02)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.2)
    assert "lock" not in got, "the second run must wait while the first commits"
    lock.release_commit_lock(first)
    t.join(timeout=10)
    body = json.loads(Path(got["lock"].uri).read_text())
    assert body["run_id"] == "second" and body["pid"] == os.getpid() and body["host"]
    got["lock"].refresh(every_s=0)  # a long commit keeps its lock fresh...
    Path(got["lock"].uri).write_text(json.dumps({"token": "someone-else", "run_id": "thief"}))
    with pytest.raises(CommitLockLost):  # ...and stops publishing if it was taken over meanwhile
        got["lock"].refresh(every_s=0)
    lock.release_commit_lock(got["lock"])  # never removes another run's lock
    assert json.loads(Path(got["lock"].uri).read_text())["run_id"] == "thief"


def test_stale_commit_lock_is_taken_over(tmp_path):
    layout = ledger.Layout(str(tmp_path / "out"))
    lock_path = Path(layout.commit_lock())
    lock_path.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # 1. its owner's process on this host is gone: taken over at once
    lock_path.write_text(
        json.dumps({"token": "t1", "run_id": "crashed", "host": socket.gethostname(), "pid": dead.pid})
    )
    held = lock.acquire_commit_lock(layout, "next", wait_s=1)
    lock.release_commit_lock(held)
    # 2. a live owner elsewhere that stopped refreshing its lock: taken over after stale_s
    lock_path.write_text(json.dumps({"token": "t2", "run_id": "hung", "host": "other-host", "pid": 1}))
    old = time.time() - 120
    os.utime(lock_path, (old, old))
    with pytest.raises(CommitLockTimeout):
        lock.acquire_commit_lock(layout, "next", wait_s=0.2, stale_s=3600)
    held = lock.acquire_commit_lock(layout, "next", wait_s=1, stale_s=60)
    assert json.loads(lock_path.read_text())["run_id"] == "next"
    lock.release_commit_lock(held)


@pytest.mark.integration
def test_s3_commit_lock_is_a_conditional_put_and_survives_lost_answers(s3_server):
    bucket, direct = make_bucket(s3_server)
    # every lock PUT lands, but its answer is lost: the retry sees 412 and must recognise its own token
    with FaultProxy(s3_server, [Burst("PUT", lambda p: p.endswith("commit.lock"), 1, "reset_after")]) as proxy:
        layout = ledger.Layout(f"s3://{bucket}/out", via(proxy, direct))
        held = lock.acquire_commit_lock(layout, "first", wait_s=5)
        proxy.rules.clear()
        with pytest.raises(CommitLockTimeout, match="held by run first"):
            lock.acquire_commit_lock(layout, "second", wait_s=0.3)
        held.refresh(every_s=0)  # a conditional overwrite (If-Match on its ETag): still ours, still releasable
        lock.release_commit_lock(held)
        second = lock.acquire_commit_lock(layout, "second", wait_s=1)  # so the release really deleted it
        # a stale lock is deleted only if it is still the one judged stale (conditional delete on its ETag)
        second.etag = '"not-its-etag"'
        lock.release_commit_lock(second)
        fs = filesystem("s3://", direct)
        assert fs.exists(f"{bucket}/out/_locks/commit.lock")
        fs.rm(f"{bucket}/out/_locks/commit.lock")


# --------------------------------------------------------------------------------------------- hostile inputs
@pytest.mark.integration
def test_manifest_uris_that_404_become_error_rows(images, model, tmp_path, s3_server):
    bucket, direct = make_bucket(s3_server)
    files = sorted(str(p) for p in Path(images).iterdir())[:4]
    missing = [str(tmp_path / "gone.jpg"), f"s3://{bucket}/nope/missing.jpg"]
    out = tmp_path / "out"
    cfg = TagJobConfig(model=model, source=_manifest(tmp_path / "m.csv", files + missing), output=str(out),
                       storage_options=direct)  # fmt: skip
    res = run(cfg)
    assert res.ok == 4 and res.error == 2 and res.manifest is not None
    rows = {r["uri"]: r for r in committed_rows(str(out)).to_pylist()}
    assert set(rows) == set(files + missing)
    for uri in missing:
        assert rows[uri]["status"] == "error" and rows[uri]["error"].startswith("read: FileNotFoundError"), rows[uri]


def test_empty_source_is_nothing_to_do_with_exit_0(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "catalog_tagger.cli", "tag", "--model", model, "--source", str(empty),
                           "--output", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to do: the source has no images" in proc.stdout + proc.stderr
    header_only = tmp_path / "empty.csv"
    header_only.write_text("uri\n")
    res = run(TagJobConfig(model=model, source=str(header_only), output=str(out)))
    assert res.manifest is None and res.listed == 0 and "nothing to do: the source has no images" in res.notes
    assert visible_files(out) == [] and not (out / "_staging" / res.run_id).exists()


UNICODE_NAMES = ["café crème.jpg", "日本 語/写真 1.png", "a+b (1) & c.jpg", "ümlaut%20ß.jpeg"]


def _unicode_copies(images: str, dest: Path) -> list[Path]:
    srcs = sorted(Path(images).iterdir())
    made = []
    for src, name in zip(srcs, UNICODE_NAMES, strict=False):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
        made.append(target)
    return made


@pytest.mark.slow
@pytest.mark.integration
def test_unicode_and_spaces_in_keys_local_and_s3(images, model, tmp_path, s3_server):
    src = tmp_path / "uni cat"
    made = _unicode_copies(images, src)
    out = tmp_path / "out"
    res = run(TagJobConfig(model=model, source=str(src), output=str(out)))
    assert res.ok == len(UNICODE_NAMES)
    assert sorted(committed_rows(str(out)).column("uri").to_pylist()) == sorted(str(p) for p in made)
    assert run(TagJobConfig(model=model, source=str(src), output=str(out))).processed == 0  # identity round-trips

    bucket, direct = make_bucket(s3_server)
    fs = filesystem("s3://", direct)
    for p in made:
        fs.put_file(str(p), f"{bucket}/uni cat/{p.relative_to(src).as_posix()}")
    cfg = TagJobConfig(
        model=model, source=f"s3://{bucket}/uni cat", output=f"s3://{bucket}/out", storage_options=direct
    )
    res = run(cfg)
    assert res.ok == len(UNICODE_NAMES)
    uris = sorted(committed_rows(f"s3://{bucket}/out", direct).column("uri").to_pylist())
    assert uris == sorted(f"s3://{bucket}/uni cat/{n}" for n in UNICODE_NAMES)
    assert run(cfg).processed == 0
