"""Outputs and runs (issue 13, cases 9-12): dead commit locks and leftovers of killed runs, a missing output
bucket, Ctrl-C with a resume command, an unreachable S3 endpoint.

Every CLI case runs the real ``catalog-tagger`` in a subprocess; S3 cases run against moto's server.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pyarrow as pa
import pytest
from modelkit import committed_rows

from catalog_tagger.errors import CommitLockTimeout
from catalog_tagger.schema import ACCEL_COL, DECODE_COL
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag import delta, lock, ray_runtime, writer
from catalog_tagger.tag import sink as sink_module
from catalog_tagger.tag.checks import validate
from catalog_tagger.tag.cluster import tag_entrypoint
from catalog_tagger.tag.job import TagJobConfig, run
from catalog_tagger.tag.predictor import ENV_BATCH_DELAY_S

N_IMAGES = 12
CLI = [sys.executable, "-m", "catalog_tagger.cli"]


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=N_IMAGES, seed=13, min_size=64, max_size=96, name="outputs")


def committed_uris(out: Path) -> list[str]:
    return sorted(committed_rows(out).column("uri").to_pylist())


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def no_space(*_args: object) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def age(path: Path, seconds: float) -> None:
    """Make ``path`` look ``seconds`` old (the rerun comes after the failure)."""
    old = time.time() - seconds
    os.utime(path, (old, old))


# --------------------------------------------------------------------------------------------- 9. the commit lock
@pytest.mark.timeout(60)
def test_empty_or_unparseable_commit_lock_is_taken_over_at_once(tmp_path, monkeypatch):
    layout = ledger.Layout(str(tmp_path / "out"))
    lock_path = Path(layout.commit_lock())
    # Disk full while the lock is written: the O_EXCL create lands, the write of its body fails.
    with monkeypatch.context() as m:
        m.setattr(os, "write", no_space)
        with pytest.raises(OSError, match="No space left"):
            lock.acquire_commit_lock(layout, "disk-full", wait_s=1)
    assert lock_path.read_bytes() == b"", "the failed write leaves an empty, ownerless lock"
    for body in (b"", b'{"token": "t", "run_id": "half-writ', b"\x00\x00\x00", b"[]", b"{}"):
        lock_path.write_bytes(body)
        age(lock_path, 10)
        held = lock.acquire_commit_lock(layout, "next", wait_s=1)  # not the ~15 min stale wait
        assert json.loads(lock_path.read_text())["run_id"] == "next", body
        lock.release_commit_lock(held)
    # A local lock is created empty and written a moment later: one that young is left alone.
    monkeypatch.setattr(lock, "LOCK_UNWRITTEN_S", 3600.0)
    lock_path.write_bytes(b"")
    with pytest.raises(CommitLockTimeout):
        lock.acquire_commit_lock(layout, "next", wait_s=0.3)


@pytest.mark.timeout(120)
def test_run_after_a_disk_full_lock_commits_without_waiting(kit, tmp_path):
    out = tmp_path / "out"
    lock_path = out / "_locks" / "commit.lock"
    lock_path.parent.mkdir(parents=True)
    lock_path.write_bytes(b"")
    age(lock_path, 60)
    res = run(TagJobConfig(model=kit["model"], source=kit["source"], output=str(out), executor="local"))
    assert res.ok == N_IMAGES and res.manifest is not None
    assert not lock_path.exists()


def test_lock_of_a_committed_run_elsewhere_is_taken_over_at_once(tmp_path):
    layout = ledger.Layout(str(tmp_path / "out"))
    schema = pa.schema([("uri", pa.string()), ("run_date", pa.date32())])
    table = delta.ensure_table(layout.table_uri(), schema, None, partition_by=["run_date"])
    delta.commit_run(table, "done", [], schema, {"run_id": "done"})  # run "done" is committed (no files)
    lock_path = Path(layout.commit_lock())
    lock_path.parent.mkdir(parents=True)
    # A live-looking owner on another host (its pid cannot be checked) whose run is committed.
    lock_path.write_text(json.dumps({"token": "t", "run_id": "done", "host": "elsewhere", "pid": 1}))
    held = lock.acquire_commit_lock(layout, "next", wait_s=1)
    lock.release_commit_lock(held)
    # ...but a fresh lock of an uncommitted run elsewhere is waited for.
    lock_path.write_text(json.dumps({"token": "t", "run_id": "busy", "host": "elsewhere", "pid": 1}))
    with pytest.raises(CommitLockTimeout):
        lock.acquire_commit_lock(layout, "next", wait_s=0.3)


_KILLED_AFTER_MANIFEST = """
import os, signal, sys
from catalog_tagger.tag import commit
from catalog_tagger.tag.job import TagJobConfig, run

real = commit.write_json


def write_json(uri, data, storage_options=None):
    real(uri, data, storage_options)
    if os.sep + "runs" + os.sep in uri:  # the manifest's copy, after the commit: SIGKILL before anything else
        os.kill(os.getpid(), signal.SIGKILL)


commit.write_json = write_json
run(TagJobConfig(model=sys.argv[1], source=sys.argv[2], output=sys.argv[3], run_id="killed", executor="local"))
"""


@pytest.mark.timeout(180)
def test_sigkill_after_the_manifest_leftovers_are_cleaned_by_the_next_run(kit, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_AFTER_MANIFEST, kit["model"], kit["source"], str(out)],
                          capture_output=True, text=True, timeout=150)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    staging, lock_path = out / "_staging" / "killed", out / "_locks" / "commit.lock"
    assert (out / "runs" / "killed.json").exists() and staging.exists() and lock_path.exists()
    # As if the killed run ran on another machine sharing the output: its pid says nothing here.
    body = json.loads(lock_path.read_text())
    lock_path.write_text(json.dumps({**body, "host": "another-host"}))

    res = run(TagJobConfig(model=kit["model"], source=kit["source"], output=str(out), executor="local"))
    assert res.manifest is None and res.unchanged == N_IMAGES  # nothing to commit: the lock is never needed...
    assert not staging.exists() and not lock_path.exists()  # ...and the leftovers are gone anyway
    assert len(committed_uris(out)) == N_IMAGES == len(set(committed_uris(out)))


# --------------------------------------------------------------------------------------------- 10. missing bucket
def _s3_env(endpoint: str) -> dict[str, str]:
    return {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@pytest.mark.integration
def test_missing_s3_output_bucket_is_refused_by_name_and_not_created(kit, s3_server, s3_bucket):
    import boto3
    from botocore.exceptions import ClientError

    bucket, opts = s3_bucket
    missing = f"{bucket}-typo"
    cmd = [*CLI, "tag", "--model", kit["model"], "--source", kit["source"], "--output", f"s3://{missing}/tags"]
    proc = subprocess.run(cmd, env=_s3_env(s3_server), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"output bucket {missing!r} does not exist" in proc.stderr and "Traceback" not in proc.stderr
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="k",
                      aws_secret_access_key="s")  # fmt: skip
    with pytest.raises(ClientError, match=r"404|Not Found|NoSuchBucket"):
        s3.head_bucket(Bucket=missing)
    # A new prefix inside an existing bucket is fine (and the probe does not stay behind).
    validate(TagJobConfig(model=kit["model"], source=kit["source"], output=f"s3://{bucket}/new/tags",
                          storage_options=opts))  # fmt: skip
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


# --------------------------------------------------------------------------------------------- 11. Ctrl-C
def _rows(n: int, start: int = 0) -> pa.Table:
    uris = [f"/img/{i}.jpg" for i in range(start, start + n)]
    zeros = pa.array([0.0] * n, pa.float64())
    return pa.table({"uri": uris, "status": ["ok"] * n, ACCEL_COL: zeros, DECODE_COL: zeros})


def test_sink_stages_on_a_time_budget_as_well_as_a_row_budget(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(sink_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    schema = pa.schema([("uri", pa.string()), ("status", pa.string())])
    part = writer.PartWriter(str(tmp_path), "r", "2026-11-29", None, schema)
    sink = sink_module.Sink(part, rows_per_shard=100, shard_seconds=60.0)

    def written() -> list[int]:
        return sorted(f.rows for f in writer.staged_files(str(tmp_path), "r", None))

    sink.add(_rows(3))
    now[0] = 30.0
    sink.add(_rows(3, 3))
    assert written() == [], "the oldest row waited 30 s < 60 s"
    now[0] = 61.0
    sink.add(_rows(2, 6))
    assert written() == [8], "the oldest row waited 61 s: everything pending is written"
    now[0] = 62.0
    sink.add(_rows(150, 8))  # the row budget still applies, and the rest starts a new wait
    now[0] = 100.0
    sink.add(_rows(1, 158))
    assert written() == [8, 100]
    sink.flush()
    assert written() == [8, 51, 100] and sink.totals.files == 3 and sink.totals.ok == 159


def test_shard_seconds_travels_to_a_ray_jobs_submission():
    cfg = TagJobConfig(model="m", source="s", output="o", run_id="r", shard_seconds=5)
    argv = shlex.split(tag_entrypoint(cfg))
    assert argv[argv.index("--shard-seconds") + 1] == "5.0"


def _wait_for_staged_shard(proc: subprocess.Popen, out: Path, log: Path) -> Path:
    deadline = time.monotonic() + 240
    while not (staged := list((out / "_staging").glob("*/files/part-*.json"))):
        assert proc.poll() is None, f"the CLI ended before writing a data file:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no data file written in 240 s"
        time.sleep(0.05)
    return staged[0].parent.parent


@pytest.mark.slow
@pytest.mark.parametrize(
    ("executor", "signum", "code"),
    [("local", signal.SIGINT, 130), ("ray", signal.SIGINT, 130), ("local", signal.SIGTERM, 143)],
    ids=["local-sigint", "ray-sigint", "local-sigterm"],
)
def test_ctrl_c_prints_the_resume_command_and_the_rerun_resumes(kit, tmp_path, executor, signum, code):
    out = tmp_path / "out"
    # A small run (far under the default 20,000 rows per shard): the time budget stages it shard by shard.
    cmd = [*CLI, "tag", "--model", kit["model"], "--source", kit["source"], "--output", str(out),
           "--batch-size", "2", "--shard-seconds", "1", "--device", "cpu", "--executor", executor]  # fmt: skip
    log = tmp_path / "cli.log"
    with open(log, "wb") as fh:
        env = {**os.environ, ENV_BATCH_DELAY_S: "1"}  # slow batches: the interrupt lands mid-run
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            run_id = _wait_for_staged_shard(proc, out, log).name
            family = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signum)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == code, text[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"Ray processes outlived the interrupted driver: {alive}"
    assert f"interrupted: run {run_id} did not finish" in text and "Traceback" not in text
    resume = next(line for line in text.splitlines() if line.startswith("catalog-tagger tag "))
    argv = shlex.split(resume)
    assert argv[-2:] == ["--run-id", run_id] and argv[1:-2] == cmd[len(CLI) :]
    assert not (out / "runs").exists(), "an interrupted run commits nothing"

    again = subprocess.run([*CLI, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((out / "runs" / f"{run_id}.json").read_text())
    assert manifest["counts"]["resumed"] > 0 and manifest["counts"]["ok"] == N_IMAGES
    assert len(committed_uris(out)) == N_IMAGES == len(set(committed_uris(out)))


def test_interrupts_are_held_while_ray_starts_and_the_handlers_put_back():
    int_before, term_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with ray_runtime.signals_held() as held:
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt inside the block: Ray's start-up is not cut
    assert held == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is int_before and signal.getsignal(signal.SIGTERM) == term_before

    def ray_handler(*_: object) -> None:  # what ray.init installs first thing (sys.exit)
        raise AssertionError("not called")

    def caller_handler(*_: object) -> None:  # e.g. the CLI's, which raises Terminated
        raise AssertionError("not called")

    try:
        for before, after in ((signal.SIG_DFL, ray_handler), (caller_handler, caller_handler)):
            signal.signal(signal.SIGTERM, before)
            with ray_runtime.signals_held():
                signal.signal(signal.SIGTERM, ray_handler)
            assert signal.getsignal(signal.SIGTERM) is after
    finally:
        signal.signal(signal.SIGTERM, term_before)


# --------------------------------------------------------------------------------------------- 12. unreachable S3
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_unreachable_s3_endpoint_is_one_line_and_exit_75(kit, tmp_path):
    # AWS_MAX_ATTEMPTS=1 keeps the test short: botocore's default retries a refused connection 5 times per
    # s3fs attempt (5 of them), about 9 s per call; a silent endpoint costs 25 x the 60 s read timeout.
    env = {**_s3_env(f"http://127.0.0.1:{closed_port()}"), "AWS_MAX_ATTEMPTS": "1"}
    cmd = ["tag", "--model", kit["model"], "--source", "s3://bucket/images", "--output", str(tmp_path / "out")]
    proc = subprocess.run([*CLI, *cmd], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 75, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "EndpointConnectionError" in lines[0] and "transient" in lines[0]
    verbose = subprocess.run([*CLI, "-v", *cmd], env=env, capture_output=True, text=True, timeout=100)
    assert verbose.returncode == 75 and "Traceback" in verbose.stderr


# --------------------------------------------------------------------------------------------- a model promoted mid-run
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_model_replaced_mid_run_is_refused_not_mixed(executor, catalog_kit, tmp_path, monkeypatch, request) -> None:
    """A promotion copies a new model into the folder a nightly run reads. A Predictor started after the run
    validated the artifact loads the new weights: it refuses them, so one run's rows never carry two models. On
    Ray the refusal comes back from the actor as the same one-line error, not a remote traceback."""
    if executor == "ray":
        request.getfixturevalue("ray_local")
    import shutil

    import torch

    from catalog_tagger.config import load_tasks
    from catalog_tagger.errors import ArtifactError
    from catalog_tagger.model.artifact import card_for, load_card, save_artifact
    from catalog_tagger.model.multihead import build_model
    from catalog_tagger.tag import job

    kit = catalog_kit(images=4, name=f"promoted-mid-run-{executor}", min_size=64, max_size=80)
    current = tmp_path / "current"
    shutil.copytree(kit["model"], current)
    before = load_card(str(current)).version
    torch.manual_seed(7)
    other = build_model(backbone="tiny_cnn", tasks=load_tasks(kit["tasks"]))

    def promote_then_execute(*args, **kwargs):  # the promotion lands between validation and the predictor's load
        save_artifact(other, card_for(other, image_size=32), current)
        return real_execute(*args, **kwargs)

    real_execute = job.execute
    monkeypatch.setattr(job, "execute", promote_then_execute)
    out = tmp_path / "out"
    cfg = TagJobConfig(model=str(current), source=kit["source"], output=str(out), executor=executor, calibrate=False)
    with pytest.raises(ArtifactError, match=rf"changed during the run: the run started with version {before}"):
        run(cfg)
    assert load_card(str(current)).version != before
    assert committed_rows(out).num_rows == 0  # nothing of the run is visible to any reader


def test_user_errors_come_back_from_ray_actors_as_themselves() -> None:
    from catalog_tagger.errors import ArtifactError
    from catalog_tagger.tag.executors import user_error_in

    text = (
        "The actor died because of an error raised in its creation task\n  File x, line 3\n"
        "catalog_tagger.errors.ArtifactError: model m changed during the run: the run started with version a\n"
    )
    err = user_error_in(RuntimeError(text))
    assert (
        isinstance(err, ArtifactError) and str(err) == "model m changed during the run: the run started with version a"
    )
    assert user_error_in(RuntimeError("catalog_tagger.errors.OutputWriteError: x")) is not None  # a UserError too
    assert user_error_in(RuntimeError("ValueError: boom")) is None  # anything else stays Ray's own error
    assert user_error_in(RuntimeError("catalog_tagger.errors.NoSuchThing: x")) is None
