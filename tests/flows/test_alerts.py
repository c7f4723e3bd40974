"""deploy/automations.yaml on a real local Prefect (deploy/local.sh: server, deployments, worker): installed twice
by ``flows.alerts.ensure_automations`` (one of each), a failed nightly deployment run and a drift event each reach a
webhook notification block that posts to an HTTP server of this test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, TypeAlias
from uuid import uuid4

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.alerts import ensure_automations, load_automations

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
BLOCK_NAME = "catalog-tagger-alerts-test"


def _load_e2e() -> ModuleType:
    """test_deploy_e2e.py's LocalPrefect and its deploy/local.sh fixture (one pattern, not a copy)."""
    spec = importlib.util.spec_from_file_location("_deploy_e2e", Path(__file__).with_name("test_deploy_e2e.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_e2e = _load_e2e()
local_prefect = _e2e.local_prefect  # the module-scoped fixture: a server of its own for this module
LocalPrefect: TypeAlias = Any  # _e2e.LocalPrefect (loaded by path, so opaque to mypy)


class Webhook:
    """A threaded HTTP server on loopback that records the JSON body of every POST."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, what: Callable[[dict[str, Any]], bool], limit_s: float = 120) -> dict[str, Any]:
        """The first POST for which ``what`` holds, polled until ``limit_s`` (the triggers service runs every few s)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            for post in list(self.posts):
                if what(post):
                    return post
            time.sleep(1)
        pytest.fail(f"no matching notification within {limit_s} s; received: {self.posts}")


def _api(lp: LocalPrefect) -> contextlib.AbstractContextManager[Any]:
    return temporary_settings(updates={PREFECT_API_URL: lp.api_url})


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@pytest.fixture(scope="module")
def notify_block(local_prefect: LocalPrefect, webhook: Webhook) -> str:
    """A generic webhook notification block posting ``{"subject", "body"}`` to ``webhook``; returns slug/name."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="catalog-tagger alerts",
        url=webhook.url,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
        headers=None,
        cookies=None,
    )
    with _api(local_prefect):
        block.save(BLOCK_NAME, overwrite=True)
    return f"custom-webhook/{BLOCK_NAME}"


@pytest.fixture(scope="module")
def installed(local_prefect: LocalPrefect, notify_block: str) -> list[str]:
    with _api(local_prefect):
        first = ensure_automations(notify_block)
        second = ensure_automations(BLOCK_NAME)  # by its bare name too
    assert first == second, "a second install must update the same automations, not add copies"
    return first


def test_automations_are_installed_once_with_their_triggers(local_prefect: LocalPrefect, installed: list[str]) -> None:
    autos = local_prefect.post("/automations/filter", {})
    by_name = {a["name"]: a for a in autos}
    assert len(autos) == len(by_name) == len(installed) == 4, [a["name"] for a in autos]
    assert sorted(installed) == sorted(a["id"] for a in autos)
    [block] = local_prefect.post("/block_documents/filter", {"block_documents": {"name": {"any_": [BLOCK_NAME]}}})

    failed = by_name["catalog-tagger nightly run failed or crashed"]
    assert set(failed["trigger"]["expect"]) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    related = {(r["prefect.resource.role"], r["prefect.resource.name"]) for r in failed["trigger"]["match_related"]}
    assert related == {("flow", "nightly-tagging"), ("deployment", "local")}
    for name in ("catalog-tagger drift", "catalog-tagger over error budget"):
        trigger = by_name[name]["trigger"]
        assert trigger["match"] == {"prefect.resource.id": "catalog-tagger.output.*"}
        assert [a["block_document_id"] for a in by_name[name]["actions"]] == [block["id"]]

    zombie = by_name["catalog-tagger crash zombie runs"]
    assert zombie["trigger"]["posture"] == "Proactive" and zombie["trigger"]["after"] == ["prefect.flow-run.heartbeat"]
    assert zombie["actions"][0]["type"] == "change-flow-run-state" and zombie["actions"][0]["state"] == "CRASHED"
    # ... and the deployment's flow runs emit the heartbeats it waits for.
    env = local_prefect.get("/deployments/name/nightly-tagging/local")["job_variables"]["env"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"


@pytest.mark.usefixtures("installed")
def test_a_failed_nightly_run_notifies(local_prefect: LocalPrefect, webhook: Webhook) -> None:
    proc = local_prefect.run_deployment("nightly-tagging/local", {})  # no parameters: the run fails fast
    assert proc.returncode == 1, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [run] = local_prefect.flow_runs("FAILED")
    post = webhook.wait_for(lambda p: run["id"] in p.get("body", ""))
    assert f"nightly-tagging/local run {run['name']} Failed" in post["subject"], post
    assert "source is empty" in post["body"], post


@pytest.mark.usefixtures("installed")
def test_a_drift_event_notifies(local_prefect: LocalPrefect, webhook: Webhook) -> None:
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    try:  # the shared design's slug (helper "budget"); the trigger matches any catalog-tagger.output.<slug>
        from flows.artifacts import output_slug

        slug = output_slug("s3://bucket/catalog/out")
    except ImportError:
        slug = "catalog-out-0a1b2c3d"
    drift = [{"task": "color", "psi": 0.41, "message": "color: label distribution moved (PSI 0.41 > 0.20)"}]
    with _api(local_prefect):
        emit_event(
            event="catalog-tagger.run.drift",
            resource={"prefect.resource.id": f"catalog-tagger.output.{slug}"},
            payload={"output": "s3://bucket/catalog/out", "run_id": "nightly-20261101-0badc0de", "drift": drift},
        )
        EventsWorker.drain_all()
    post = webhook.wait_for(lambda p: "nightly-20261101-0badc0de" in p.get("subject", ""))
    assert "drift" in post["subject"] and "PSI 0.41 > 0.20" in post["body"], post
    assert f"catalog-tagger.output.{slug}" in post["body"], post


@pytest.mark.usefixtures("installed")
def test_install_command_and_deploy_script(local_prefect: LocalPrefect) -> None:
    """`python -m flows.alerts` refuses an unknown block in one line; deploy/local.sh installs the alerts when
    CATALOG_TAGGER_NOTIFY_BLOCK is set, updating the same automations."""
    before = sorted(a["id"] for a in local_prefect.post("/automations/filter", {}))
    cmd = [sys.executable, "-m", "flows.alerts", "--block", "no-such-block"]
    proc = subprocess.run(cmd, env=local_prefect.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip()
        == "error: no block named 'no-such-block' on the Prefect server: create a notification block first"
    )

    env = local_prefect.env | {"CATALOG_TAGGER_NOTIFY_BLOCK": BLOCK_NAME}
    cmd = ["bash", str(ROOT / "deploy" / "local.sh"), "--deploy-only"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"alerts installed (deploy/automations.yaml) with notification block {BLOCK_NAME}" in proc.stdout
    assert sorted(a["id"] for a in local_prefect.post("/automations/filter", {})) == before


async def _running_nightly_run(zombie_within_s: float) -> tuple[Any, Any]:
    """(flow run, deployment): a run of the nightly deployment created Running (no worker ever picks it up), after
    shortening the zombie automation's silence to ``zombie_within_s``."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    async with get_client() as client:
        [zombie] = await client.read_automations_by_name("catalog-tagger crash zombie runs")
        [shorter] = [a for a in load_automations(uuid4()) if a.name == zombie.name]  # the file's, no block needed
        shorter.trigger.within = timedelta(seconds=zombie_within_s)  # type: ignore[union-attr]
        await client.update_automation(zombie.id, shorter)
        deployment = await client.read_deployment_by_name("nightly-tagging/local")
        run = await client.create_flow_run_from_deployment(deployment.id, state=Running())
    return run, deployment


def test_a_run_whose_heartbeats_stop_is_crashed_and_notifies(local_prefect: LocalPrefect, webhook: Webhook) -> None:
    """A run whose process sent one heartbeat and died. The last test: it shortens the zombie automation's
    silence to 15 s (600 s in deploy/automations.yaml)."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    with _api(local_prefect):
        created = run_coro_as_sync(_running_nightly_run(15))
        assert created is not None
        run, deployment = created
        assert "catalog-tagger" in run.tags
        tags = [{"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in run.tags]
        # The event the flow engine's heartbeat thread emits (flow_engine._build_heartbeat_event_template).
        emit_event(
            event="prefect.flow-run.heartbeat",
            resource={"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name},
            related=[
                {"prefect.resource.id": f"prefect.deployment.{deployment.id}", "prefect.resource.role": "deployment"},
                *tags,
            ],
        )
        EventsWorker.drain_all()
    post = webhook.wait_for(lambda p: str(run.id) in p.get("body", "") and "Crashed" in p.get("subject", ""))
    assert f"nightly-tagging/local run {run.name} Crashed" in post["subject"], post
    assert "No heartbeat for" in post["body"], post
    assert local_prefect.get(f"/flow_runs/{run.id}")["state"]["type"] == "CRASHED"
