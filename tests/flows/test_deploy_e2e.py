"""The real client path: deploy/local.sh (server + pool + deployments + worker), `prefect deployment run --watch`.

The server is deployed to with no ``CATALOG_TAGGER_*`` variable set, in deploy/local.sh's environment and the
worker's alike (the way deploy/prefect.yaml's header says to deploy); the tests run in file order.
"""

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
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from catalog_tagger.figures import SAVINGS_RECORDS
from flows.artifacts import artifact_key

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

    def deploy(self, **variables: str) -> subprocess.CompletedProcess[str]:
        """`prefect deploy` as deploy/prefect.yaml's header says, with ``CATALOG_TAGGER_<key>`` set to each value."""
        env = self.env | {f"CATALOG_TAGGER_{k}": v for k, v in variables.items()}
        cmd = [str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all"]
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)

    def run_deployment(self, name: str, params: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """`prefect deployment run NAME -p k=v ... --watch`: exits 0 when the run completes, 1 when it fails."""
        cmd = [str(VENV_BIN / "prefect"), "deployment", "run", name, "--watch", "--watch-timeout", "240"]
        for key, value in params.items():
            cmd += ["-p", f"{key}={value}"]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300, cwd=ROOT)

    def flow_runs(self, state: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": [state]}}}})


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS", "CATALOG_TAGGER_"))}
    env |= {
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "VENV_BIN": str(VENV_BIN),
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "CATALOG_TAGGER_PREFECT_PORT": str(port),
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


def test_deployed_without_any_variable(local_prefect: LocalPrefect) -> None:
    """Every setting has an explicit default, stored in the deployment (none is left for the worker to resolve)."""
    workdir = {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    for name in ("nightly-tagging/local", "backfill/local", "train-model/local"):
        assert local_prefect.get(f"/deployments/name/{name}")["pull_steps"] == [workdir], name
    nightly = local_prefect.get("/deployments/name/nightly-tagging/local")
    assert nightly["parameters"] == {"source": "", "output": "", "model": ""}
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["timezone"] == "UTC" and schedule["active"] is False
    said = " ".join(local_prefect.log.read_text(errors="replace").split())
    assert f"CATALOG_TAGGER_HOME is unset: flow runs start in {ROOT} (the directory deployed from)" in said
    assert "CATALOG_TAGGER_TZ is unset: the nightly cron runs at 02:00 UTC" in said
    assert "nightly schedule is created paused" in said


def test_deployment_run_commits_the_catalog(local_prefect: LocalPrefect, catalog: dict[str, str]) -> None:
    """A run of the deployment made without CATALOG_TAGGER_HOME, by a worker without it, starts in the checkout."""
    assert not any(k.startswith("CATALOG_TAGGER_") and k != "CATALOG_TAGGER_PREFECT_PORT" for k in local_prefect.env)
    proc = local_prefect.run_deployment("nightly-tagging/local", {k: catalog[k] for k in ("source", "output", "model")})
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

    [run] = local_prefect.flow_runs("COMPLETED")
    assert re.fullmatch(r"nightly-\d{4}-\d{2}-\d{2}", run["name"])
    key = artifact_key("nightly", "savings", catalog["output"])  # per output: two catalogs never share a key
    arts = local_prefect.post("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})
    assert arts and arts[0]["flow_run_id"] == run["id"]
    rows = json.loads(arts[0]["data"]) if isinstance(arts[0]["data"], str) else arts[0]["data"]
    assert {r["key"]: r["value"] for r in rows} == {
        k: v for k, v in manifest["savings"].items() if k not in SAVINGS_RECORDS
    }


def test_a_run_without_its_parameters_fails_naming_them(local_prefect: LocalPrefect) -> None:
    proc = local_prefect.run_deployment("nightly-tagging/local", {})
    assert proc.returncode == 1, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [run] = local_prefect.flow_runs("FAILED")
    logs = local_prefect.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})
    text = "\n".join(entry["message"] for entry in logs)
    assert "parameter source: Value error, source is empty: pass -p source=..." in text, text[-3000:]
    assert "FileNotFoundError" not in text


def test_a_bad_timezone_fails_the_deploy_in_one_line(local_prefect: LocalPrefect) -> None:
    before = local_prefect.get("/deployments/name/nightly-tagging/local")["updated"]
    proc = local_prefect.deploy(TZ="Europe/Berln")
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "error: CATALOG_TAGGER_TZ='Europe/Berln' is not an IANA timezone name" in out, out[-3000:]
    assert "Traceback" not in out
    assert local_prefect.get("/deployments/name/nightly-tagging/local")["updated"] == before


def test_nightly_deployment_is_scheduled_and_never_overlaps(local_prefect: LocalPrefect, tmp_path: Path) -> None:
    """Deployed with every variable set: the defaults are stored, and the schedule is active in that timezone."""
    values = {"source": str(tmp_path / "images"), "output": str(tmp_path / "out"), "model": str(tmp_path / "model")}
    proc = local_prefect.deploy(TZ="Europe/Berlin", HOME=str(ROOT), **{k.upper(): v for k, v in values.items()})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "WARNING" not in proc.stdout + proc.stderr  # no default applied, nothing to say
    dep = local_prefect.get("/deployments/name/nightly-tagging/local")
    assert dep["parameters"] == values
    [schedule] = dep["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] is True
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
    berlin = ZoneInfo("Europe/Berlin")
    starts = [datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")).astimezone(berlin) for r in runs]
    assert all((s.hour, s.minute) == (2, 0) for s in starts), starts
