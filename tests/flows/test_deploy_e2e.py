"""The real client path: deploy/local.sh (server + pool + deployments + worker), `prefect deployment run --watch`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@dataclass
class LocalPrefect:
    api_url: str
    env: dict[str, str]
    log: Path

    def get(self, path: str):
        import httpx

        return httpx.get(f"{self.api_url}{path}", timeout=10).raise_for_status().json()

    def post(self, path: str, body: dict):
        import httpx

        return httpx.post(f"{self.api_url}{path}", json=body, timeout=10).raise_for_status().json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the script's process group, SIGKILL after a grace period (a worker may ignore SIGTERM once its
    server is gone), then every descendant recorded before (flow-run processes start their own sessions)."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


@pytest.fixture(scope="module")
def local_prefect(tmp_path_factory) -> Iterator[LocalPrefect]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env |= {
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "VENV_BIN": str(VENV_BIN),
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "CATALOG_TAGGER_PREFECT_PORT": str(port),
        "CATALOG_TAGGER_TZ": "UTC",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick the run up quickly (default 10 s)
    }
    log = home / "deploy-local.log"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "deploy" / "local.sh")],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while "worker started" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"deploy/local.sh did not come up:\n{log.read_text(errors='replace')[-6000:]}")
            time.sleep(0.5)
        yield LocalPrefect(api_url=api_url, env=env, log=log)
    finally:
        _stop_group(proc)


@pytest.fixture(scope="module")
def catalog(catalog_kit) -> dict[str, str]:
    kit = catalog_kit(name="e2e")
    return {"source": kit["source"], "model": kit["model"], "output": str(Path(kit["root"]) / "out")}


def test_deployment_run_commits_the_catalog(local_prefect: LocalPrefect, catalog: dict[str, str]) -> None:
    cmd = [str(VENV_BIN / "prefect"), "deployment", "run", "nightly-tagging/local", "--watch"]
    cmd += ["--watch-timeout", "240"]
    for key in ("source", "output", "model"):
        cmd += ["-p", f"{key}={catalog[key]}"]
    proc = subprocess.run(cmd, env=local_prefect.env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n--- deploy/local.sh ---\n"
        + local_prefect.log.read_text(errors="replace")[-6000:]
    )

    out = Path(catalog["output"])
    [manifest_path] = list((out / "runs").glob("*.json"))
    manifest = json.loads(manifest_path.read_text())
    assert re.fullmatch(r"nightly-\d{8}-[0-9a-f]{8}", manifest["run_id"])
    assert manifest["counts"]["rows"] == manifest["counts"]["ok"] == 20

    import pyarrow.dataset as pads

    assert pads.dataset(str(out / "predictions"), format="parquet").count_rows() == 20

    [run] = local_prefect.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert re.fullmatch(r"nightly-\d{4}-\d{2}-\d{2}", run["name"])
    arts = local_prefect.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["nightly-savings"]}}})
    assert arts and arts[0]["flow_run_id"] == run["id"]
    rows = json.loads(arts[0]["data"]) if isinstance(arts[0]["data"], str) else arts[0]["data"]
    assert {r["key"]: r["value"] for r in rows} == manifest["savings"]


def test_nightly_deployment_is_scheduled_and_never_overlaps(local_prefect: LocalPrefect) -> None:
    dep = local_prefect.get("/deployments/name/nightly-tagging/local")
    [schedule] = dep["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    limit = dep.get("global_concurrency_limit") or {}
    assert limit.get("limit") == 1
    assert dep["parameter_openapi_schema"]["required"] == ["source", "output", "model"]

    # The server's scheduler must turn the cron into scheduled runs (Prefect 3.8's fails under SQLAlchemy 2.1).
    deadline = time.monotonic() + 60
    runs: list = []
    while not runs and time.monotonic() < deadline:
        body = {
            "deployments": {"id": {"any_": [dep["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        }
        runs = local_prefect.post("/flow_runs/filter", body)
        time.sleep(2)
    assert runs, (
        "the Prefect scheduler created no scheduled run for the nightly cron; if the server log shows "
        '"Can\'t evaluate bulk DML statement", pin sqlalchemy<2.1 (Prefect 3.8 + SQLAlchemy 2.1):\n'
        + local_prefect.log.read_text(errors="replace")[-3000:]
    )
    assert all(r["expected_start_time"].endswith(("T02:00:00Z", "T02:00:00+00:00")) for r in runs)
