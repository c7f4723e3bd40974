"""Ray paths: address parsing, Jobs API submission (fake client), and a real two-node cluster on this machine."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from catalog_tagger.errors import RayJobFailed, UserError
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag.cluster import (
    RUN_ID_METADATA,
    JobsOptions,
    job_runtime_env,
    ray_path,
    submit_tag_job,
    tag_entrypoint,
)
from catalog_tagger.tag.job import TagJobConfig

VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------------------------- unit
@pytest.mark.parametrize(
    ("address", "path"),
    [
        (None, "local"),
        ("", "local"),
        ("local", "local"),
        ("auto", "connect"),
        ("ray://head:10001", "connect"),
        ("10.0.0.5:6379", "connect"),
        ("raycluster-head-svc.ray.svc:6379", "connect"),
        ("http://127.0.0.1:8265", "jobs"),
        ("https://ray.example.com", "jobs"),
    ],
)
def test_ray_path(address: str | None, path: str) -> None:
    assert ray_path(address) == path


@pytest.mark.parametrize("address", ["ftp://x", "head", "s3://bucket", "auto please"])
def test_ray_path_refuses_nonsense(address: str) -> None:
    with pytest.raises(UserError, match="ray_address"):
        ray_path(address)


def _cfg(**kw: Any) -> TagJobConfig:
    base = dict(model="s3://b/model dir", source="s3://b/img", output="s3://b/out", run_id="r1")
    return TagJobConfig(**{**base, **kw})


def test_entrypoint_is_the_cli_tag_command_quoted() -> None:
    ep = tag_entrypoint(_cfg(full=True, limit=5, actors=2, batch_size=8, price_per_hour=1.5))
    argv = shlex.split(ep)
    assert argv[:4] == ["python", "-m", "catalog_tagger.cli", "tag"]
    opts = dict(zip(argv[4::2], argv[5::2], strict=False))
    assert opts["--model"] == "s3://b/model dir" and opts["--run-id"] == "r1" and opts["--ray-address"] == "auto"
    assert opts["--limit"] == "5" and opts["--actors"] == "2" and opts["--batch-size"] == "8"
    assert "--full" in argv and opts["--price-per-hour"] == "1.5"


def test_entrypoint_flags_exist_on_the_cli() -> None:
    import typer.main

    from catalog_tagger.cli import app

    cmd = typer.main.get_command(app).commands["tag"]
    known = {o for p in cmd.params for o in p.opts}
    cfg = _cfg(full=True, limit=1, actors=1, rows_per_shard=10, allowed_root="/data", allow_task_change=True,
               write_tasks=2)  # fmt: skip
    used = {a for a in shlex.split(tag_entrypoint(cfg)) if a.startswith("--")}
    assert {"--allowed-root", "--rows-per-shard", "--full", "--limit", "--actors", "--allow-task-change",
            "--write-tasks"} <= used  # fmt: skip
    assert used <= known


@pytest.mark.parametrize("override", [{"calibrate": False}, {"storage_options": {"k": 1}}])
def test_entrypoint_refuses_what_the_cli_cannot_carry(override: dict[str, Any]) -> None:
    with pytest.raises(UserError, match=next(iter(override))):
        tag_entrypoint(_cfg(**override))


def test_runtime_env_refuses_secrets() -> None:
    env = job_runtime_env(JobsOptions(env_vars={"AWS_ENDPOINT_URL": "http://minio:9000"}))
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "DB_PASSWORD"):
        with pytest.raises(UserError, match=name):
            job_runtime_env(JobsOptions(env_vars={name: "x"}))


@dataclass
class FakeJob:
    submission_id: str
    status: Any
    metadata: dict[str, str]
    start_time: int = 0
    message: str = ""
    driver_exit_code: int | None = None


@dataclass
class FakeJobsClient:
    """The slice of JobSubmissionClient that submit_tag_job uses; each submission ends in ``final``."""

    final: str = "SUCCEEDED"
    exit_code: int | None = 0
    logs: str = "line 1\nline 2\n"
    jobs: list[FakeJob] = field(default_factory=list)
    submitted: list[dict[str, Any]] = field(default_factory=list)

    def list_jobs(self) -> list[FakeJob]:
        return list(self.jobs)

    def submit_job(self, **kw: Any) -> str:
        from ray.job_submission import JobStatus

        self.submitted.append(kw)
        code = self.exit_code if self.final == "FAILED" else (0 if self.final == "SUCCEEDED" else None)
        job = FakeJob(kw["submission_id"], JobStatus(self.final), kw["metadata"], len(self.jobs), "ended", code)
        self.jobs.append(job)
        return kw["submission_id"]

    def _job(self, sid: str) -> FakeJob:
        return next(j for j in self.jobs if j.submission_id == sid)

    def get_job_status(self, sid: str):
        return self._job(sid).status

    def get_job_info(self, sid: str) -> FakeJob:
        return self._job(sid)

    def get_job_logs(self, sid: str) -> str:  # noqa: ARG002 - JobSubmissionClient's signature
        return self.logs

    async def tail_job_logs(self, sid: str):  # noqa: ARG002 - JobSubmissionClient's signature
        for chunk in ("line 1\nli", "ne 2\n"):
            yield chunk


def _manifest(out: Path, run_id: str) -> None:
    """A committed run, as the job would leave it: a Delta commit carrying the run id and its manifest."""
    import pyarrow as pa

    from catalog_tagger.tag import delta

    schema = pa.schema([("uri", pa.string()), ("run_date", pa.date32())])
    table = delta.ensure_table(ledger.Layout(str(out)).table_uri(), schema, None, partition_by=["run_date"])
    manifest = {"run_id": run_id, "counts": {"listed": 3, "rows": 3, "ok": 2, "error": 1, "unchanged": 0}, "notes": []}
    delta.commit_run(table, run_id, [], schema, manifest)


def test_jobs_success_reads_the_committed_manifest(tmp_path: Path) -> None:
    client = FakeJobsClient()
    _manifest(tmp_path, "r1")
    lines: list[str] = []
    res = submit_tag_job(_cfg(output=str(tmp_path)), client=client, on_log=lines.append)
    assert (res.ok, res.error, res.processed) == (2, 1, 3) and res.manifest is not None
    assert lines == ["line 1", "line 2"]
    [sub] = client.submitted
    assert sub["submission_id"] == "catalog-tagger-r1-1" and sub["metadata"] == {RUN_ID_METADATA: "r1"}
    assert "AWS_SECRET_ACCESS_KEY" not in sub["runtime_env"]["env_vars"]


def test_jobs_exit_code_2_is_a_user_error(tmp_path: Path) -> None:
    client = FakeJobsClient(final="FAILED", exit_code=2, logs="starting\nerror: model 's3://x' not found\n")
    with pytest.raises(UserError, match="model 's3://x' not found"):
        submit_tag_job(_cfg(output=str(tmp_path)), client=client)


@pytest.mark.parametrize(("final", "retryable"), [("FAILED", True), ("STOPPED", False)])
def test_jobs_failure_maps_to_ray_job_failed(tmp_path: Path, final: str, retryable: bool) -> None:
    client = FakeJobsClient(final=final, exit_code=1, logs="Traceback...\nRuntimeError: node died\n")
    with pytest.raises(RayJobFailed, match="node died") as err:
        submit_tag_job(_cfg(output=str(tmp_path)), client=client)
    assert err.value.retryable is retryable and err.value.status == final


def test_jobs_retry_reattaches_or_resubmits(tmp_path: Path) -> None:
    from ray.job_submission import JobStatus

    client = FakeJobsClient()
    # A failed attempt and a still-running one of the same run: re-attach to the running one, submit nothing.
    client.jobs = [
        FakeJob("catalog-tagger-r1-1", JobStatus.FAILED, {RUN_ID_METADATA: "r1"}, 1),
        FakeJob("catalog-tagger-r1-2", JobStatus.SUCCEEDED, {RUN_ID_METADATA: "r1"}, 2),
        FakeJob("other", JobStatus.RUNNING, {RUN_ID_METADATA: "r0"}, 3),
    ]
    _manifest(tmp_path, "r1")
    submit_tag_job(_cfg(output=str(tmp_path)), client=client)
    assert client.submitted == []
    client.jobs = client.jobs[:1]
    submit_tag_job(_cfg(output=str(tmp_path)), client=client)
    assert [s["submission_id"] for s in client.submitted] == ["catalog-tagger-r1-2"]


# --------------------------------------------------------------------------------------------- two-node cluster
def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class TwoNodeCluster:
    gcs: str  # 127.0.0.1:port (connect path)
    dashboard: str  # http://127.0.0.1:port (Jobs API and state API)
    env: dict[str, str]  # environment of the cluster and its clients (token auth, PATH with this venv)


def _ray_start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: torn down by group, never by name
    )
    deadline = time.monotonic() + 120
    while "block forever" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)
    return proc


def _stop(procs: list[subprocess.Popen], temp_dir: str) -> None:
    """SIGTERM our process groups, SIGKILL after a grace period, then any process of this cluster's temp dir."""
    import psutil

    for p in procs:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        _signal_group(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    # Ray workers start their own sessions; they all carry this cluster's unique temp dir on their command line.
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodeCluster]:
    """A head (2 CPUs, dashboard) plus a second node (2 CPUs, resource `second`), both `ray start` processes."""
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        msg = f"the Ray dashboard / Jobs API needs ray[default] ({missing}); add it to pyproject's ray extras"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    temp_dir = tempfile.mkdtemp(prefix="ctray-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env |= {
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the jobs' `python` is this venv's
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",  # Ray 2.60 turns token auth on; every node and client then reads ~/.ray/auth_token
    }
    p = _free_ports(16)
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
    ]
    procs: list[subprocess.Popen] = []
    try:
        head = [
            "--head",
            f"--port={p[0]}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={p[1]}",
            f"--node-manager-port={p[2]}",
            f"--object-manager-port={p[3]}",
            f"--dashboard-agent-listen-port={p[4]}",
            f"--dashboard-agent-grpc-port={p[5]}",
            f"--metrics-export-port={p[6]}",
            f"--runtime-env-agent-port={p[7]}",
        ]
        procs.append(_ray_start(head + common, Path(temp_dir) / "head.log", env))
        second = [
            f"--address=127.0.0.1:{p[0]}",
            '--resources={"second": 1}',
            f"--node-manager-port={p[8]}",
            f"--object-manager-port={p[9]}",
            f"--dashboard-agent-listen-port={p[10]}",
            f"--dashboard-agent-grpc-port={p[11]}",
            f"--metrics-export-port={p[12]}",
            f"--runtime-env-agent-port={p[13]}",
        ]
        procs.append(_ray_start(second + common, Path(temp_dir) / "second.log", env))
        yield TwoNodeCluster(gcs=f"127.0.0.1:{p[0]}", dashboard=f"http://127.0.0.1:{p[1]}", env=env)
    finally:
        _stop(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


# Runs in a fresh interpreter: a client of the test cluster must not share this process's in-process Ray (or its
# cached auth settings). Tags through catalog_tagger.cluster.run_tag, then asks Ray's state API where the job's
# Ray Data tasks and actors ran.
DRIVER = r"""
import json, sys, time
from ray.util.state import list_actors, list_nodes, list_tasks
from catalog_tagger.tag.cluster import RUN_ID_METADATA, run_tag
from catalog_tagger.tag.job import TagJobConfig

address, dashboard, model, source, output, run_id = sys.argv[1:7]
cfg = TagJobConfig(model=model, source=source, output=output, ray_address=address, run_id=run_id, actors=2,
                   batch_size=2, executor="ray", rows_per_shard=2)
res = run_tag(cfg, on_log=lambda line: print("job|", line, file=sys.stderr))
if address.startswith("http"):
    from ray.job_submission import JobSubmissionClient
    jobs = [j for j in JobSubmissionClient(dashboard).list_jobs() if (j.metadata or {}).get(RUN_ID_METADATA) == run_id]
    job_id = jobs[-1].job_id
else:
    import ray
    job_id = ray.get_runtime_context().get_job_id()
second = [n.node_id for n in list_nodes(address=dashboard, detail=True) if "second" in (n.resources_total or {})]
placed = set()
for _ in range(30):  # task events reach the state API a moment after the job ends
    tasks = list_tasks(address=dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10000)
    actors = list_actors(address=dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10000)
    placed = {t.node_id for t in tasks if "MapBatches" in t.name and t.node_id}
    placed |= {a.node_id for a in actors if "MapBatches" in a.class_name and a.node_id}
    if len(placed) >= 2:
        break
    time.sleep(1)
print("RESULT " + json.dumps({"ok": res.ok, "run_id": res.run_id, "committed": res.manifest is not None,
                              "job_id": job_id, "nodes": sorted(placed), "second": second, "notes": res.notes,
                              "write_nodes": (res.manifest or {}).get("resources", {}).get("write_nodes")}))
"""


@pytest.fixture(scope="module")
def small_catalog(catalog_kit) -> dict[str, str]:
    kit = catalog_kit(name="cluster")
    return kit


def _drive(cluster: TwoNodeCluster, address: str, catalog: dict[str, str], run_id: str) -> dict[str, Any]:
    output = str(Path(catalog["root"]) / f"out-{run_id}")
    argv = [sys.executable, "-c", DRIVER, address, cluster.dashboard, catalog["model"], catalog["source"], output]
    proc = subprocess.run([*argv, run_id], env=cluster.env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    out = json.loads(lines[-1][len("RESULT ") :])
    out["output"] = output
    return out


def _assert_two_nodes_did_the_work(res: dict[str, Any]) -> None:
    assert res["ok"] == 20 and res["committed"]
    assert len(res["second"]) == 1
    assert len(res["nodes"]) >= 2, f"the job's Ray Data tasks/actors ran on {res['nodes']} only"
    assert res["second"][0] in res["nodes"]
    # the data files were written by write tasks on both nodes, and ONE Delta commit added them all
    assert res["second"][0] in res["write_nodes"] and len(res["write_nodes"]) == 2, res["write_nodes"]
    from deltalake import DeltaTable

    history = DeltaTable(str(Path(res["output"]) / "predictions"))
    commits = [h for h in history.history() if h.get("catalog_tagger.run_id") == res["run_id"]]
    assert len(commits) == 1 and history.to_pyarrow_dataset().count_rows() == 20


@pytest.mark.slow
@pytest.mark.integration
def test_connect_path_runs_on_both_nodes(two_nodes: TwoNodeCluster, small_catalog) -> None:
    res = _drive(two_nodes, two_nodes.gcs, small_catalog, "connect-1")
    _assert_two_nodes_did_the_work(res)


@pytest.mark.slow
@pytest.mark.integration
def test_jobs_api_path_runs_on_both_nodes(two_nodes: TwoNodeCluster, small_catalog) -> None:
    res = _drive(two_nodes, two_nodes.dashboard, small_catalog, "jobs-1")
    _assert_two_nodes_did_the_work(res)
    assert any(n.startswith("ran as Ray job catalog-tagger-jobs-1-") for n in res["notes"])


@pytest.mark.slow
@pytest.mark.integration
def test_jobs_api_user_error_is_not_a_crash(two_nodes: TwoNodeCluster, small_catalog, tmp_path: Path) -> None:
    code = (
        "import sys\nfrom catalog_tagger.tag.cluster import run_tag\nfrom catalog_tagger.errors import UserError\n"
        "from catalog_tagger.tag.job import TagJobConfig\n"
        "cfg = TagJobConfig(model=sys.argv[2], source=sys.argv[3], output=sys.argv[4], ray_address=sys.argv[1], "
        "run_id='bad-1')\n"
        "try:\n    run_tag(cfg)\nexcept UserError as err:\n    print('USERERROR', err)\n"
    )
    argv = [two_nodes.dashboard, str(tmp_path / "no-model"), small_catalog["source"], str(tmp_path / "o")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], env=two_nodes.env, capture_output=True, text=True, timeout=300
    )
    assert "USERERROR" in proc.stdout and "no-model" in proc.stdout, proc.stderr[-4000:]
