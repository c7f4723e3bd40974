"""deploy/: every manifest parses and carries its essentials; entrypoints resolve; no literal secrets anywhere."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PREFECT_FILES = ["prefect.yaml", "prefect-k8s.yaml"]
FLOW_NAMES = {
    "flows/nightly.py:nightly_tagging": "nightly-tagging",
    "flows/nightly.py:backfill": "backfill",
    "flows/train.py:train_model": "train-model",
}


def _yaml(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def _deployments(name: str) -> dict[str, dict[str, Any]]:
    return {f"{FLOW_NAMES[d['entrypoint']]}/{d['name']}": d for d in _yaml(name)["deployments"]}


# --------------------------------------------------------------------------------------------- prefect.yaml
@pytest.mark.parametrize("name", PREFECT_FILES)
def test_prefect_yaml_matches_prefects_own_schema(name: str) -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(_yaml(name))
    assert model.deployments and "definitions" in _yaml(name)


def test_local_deployments() -> None:
    deps = _deployments("prefect.yaml")
    assert set(deps) == {"nightly-tagging/local", "backfill/local", "train-model/local"}
    for d in deps.values():
        assert d["work_pool"]["name"] == "catalog-tagger-local"
        assert d["enforce_parameter_schema"] is True
    nightly = deps["nightly-tagging/local"]
    [schedule] = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "{{ settings.timezone }}"
    assert schedule["active"] == "{{ settings.schedule_active }}"
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert set(nightly["parameters"]) == {"source", "output", "model"}
    assert deps["backfill/local"]["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW"
    [build] = _yaml("prefect.yaml")["build"]
    assert build == {"flows.deploy_settings.resolve_settings": {"id": "settings"}}
    [pull] = _yaml("prefect.yaml")["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ settings.home }}"


def test_k8s_deployments_submit_to_the_kuberay_head() -> None:
    deps = _deployments("prefect-k8s.yaml")
    assert set(deps) == {"nightly-tagging/k8s", "backfill/k8s"}
    cluster = _yaml("kuberay/raycluster.yaml")["metadata"]["name"]
    for d in deps.values():
        assert d["work_pool"]["name"] == "catalog-tagger-k8s"
        assert d["parameters"]["ray_address"].startswith(f"http://{cluster}-head-svc.")
        assert d["parameters"]["ray_address"].endswith(":8265")


def test_schedules_are_valid_prefect_crons() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    for name in PREFECT_FILES:
        for d in _yaml(name)["deployments"]:
            for s in d.get("schedules", []):
                CronSchedule(cron=s["cron"], timezone="UTC")


@pytest.mark.parametrize("name", PREFECT_FILES)
def test_entrypoints_load_and_parameters_exist(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # what the set_working_directory pull step does on the worker
    for key, d in _deployments(name).items():
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert flow.name == key.split("/")[0]
        params = inspect.signature(flow.fn).parameters
        assert set(d.get("parameters", {})) <= set(params), f"{key}: unknown parameters"


# --------------------------------------------------------------------------------------------- deploy settings
@pytest.mark.parametrize("name", PREFECT_FILES)
def test_every_placeholder_comes_from_the_settings_step(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No `{{ $VAR }}`: Prefect 3.8 stores '' for an unset one, and resolves it again in each flow run's pull step."""
    from flows.deploy_settings import resolve_settings

    body = (DEPLOY / name).read_text().split("\nname: ", 1)[1]  # below the header, which shows `{{ $NAME }}`
    used = set(re.findall(r"\{\{\s*([\w.$-]+)\s*\}\}", body))
    monkeypatch.setenv("CATALOG_TAGGER_WORKER_IMAGE", "img")
    keys = set(resolve_settings(worker_image=True))
    assert used and used <= {f"settings.{k}" for k in keys}, used


@pytest.fixture
def deploy_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No CATALOG_TAGGER_* variable set, and `prefect deploy` run from ``tmp_path``."""
    for var in [v for v in os.environ if v.startswith("CATALOG_TAGGER_")]:
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


@pytest.mark.usefixtures("deploy_env")
def test_settings_defaults_are_explicit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from flows import deploy_settings

    deploy_settings._say.cache_clear()
    with caplog.at_level("WARNING", logger="flows.deploy_settings"):
        s = deploy_settings.resolve_settings()
        deploy_settings.resolve_settings()  # once per deployment: each message is said once
    unset = {"source": "", "output": "", "model": "", "schedule_active": False}
    assert s == {"home": str(tmp_path), "timezone": "UTC", **unset}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3, said
    assert f"CATALOG_TAGGER_HOME is unset: flow runs start in {tmp_path}" in said[0]
    assert "02:00 UTC" in said[1] and "schedule is created paused" in said[2]


def test_settings_from_the_environment(deploy_env: pytest.MonkeyPatch) -> None:
    from flows.deploy_settings import resolve_settings

    values = {"HOME": str(ROOT), "TZ": "Europe/Berlin", "SOURCE": "s3://b/img", "OUTPUT": "/o", "MODEL": "/m"}
    for k, v in values.items():
        deploy_env.setenv(f"CATALOG_TAGGER_{k}", v)
    assert resolve_settings() == {
        "home": str(ROOT),
        "timezone": "Europe/Berlin",
        "source": "s3://b/img",
        "output": "/o",
        "model": "/m",
        "schedule_active": True,
    }
    assert resolve_settings(home="/opt/catalog-tagger")["home"] == "/opt/catalog-tagger"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CATALOG_TAGGER_TZ", "Europe/Berln", "CATALOG_TAGGER_TZ='Europe/Berln' is not an IANA timezone name"),
        ("CATALOG_TAGGER_TZ", "utc", "is not an IANA timezone name"),
        ("CATALOG_TAGGER_HOME", "catalog-tagger", "CATALOG_TAGGER_HOME='catalog-tagger' is relative"),
        ("CATALOG_TAGGER_WORKER_IMAGE", "", "CATALOG_TAGGER_WORKER_IMAGE is unset"),
    ],
)
def test_settings_refused_in_one_line(
    deploy_env: pytest.MonkeyPatch, capsys, var: str, value: str, message: str
) -> None:
    from flows.deploy_settings import resolve_settings

    deploy_env.setenv(var, value)
    with pytest.raises(SystemExit) as exc:
        resolve_settings(worker_image=True)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------- container + KubeRay
def test_dockerfile_targets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = {alias: image for image, alias in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, flags=re.M | re.I)}
    assert set(stages) == {"wheel", "ray-gpu", "prefect-worker"}
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    assert re.search(r"rayproject/ray:2\.\d+\.\d+-py311-cu\d+", args["RAY_IMAGE"])
    assert "slim" in args["PYTHON_IMAGE"]
    assert text.count("/tmp/wheels/*.whl") == 2  # the package goes into both images
    assert "catalog-tagger-k8s" in text and "CATALOG_TAGGER_HOME=/opt/catalog-tagger" in text
    [build] = _yaml("prefect-k8s.yaml")["build"]
    assert build["flows.deploy_settings.resolve_settings"]["home"] == "/opt/catalog-tagger"


def test_raycluster() -> None:
    rc = _yaml("kuberay/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265}
    [gpu] = spec["workerGroupSpecs"]
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    worker_c = gpu["template"]["spec"]["containers"][0]
    for kind in ("requests", "limits"):
        assert worker_c["resources"][kind]["nvidia.com/gpu"] == 1
    assert head_c["image"] == worker_c["image"] and "catalog-tagger-ray" in worker_c["image"]
    for c in (head_c, worker_c):
        assert c["envFrom"] == [{"secretRef": {"name": "catalog-tagger-s3", "optional": True}}]


def test_rayjob_entrypoint_is_a_real_cli_command() -> None:
    import typer.main

    from catalog_tagger.cli import app

    job = _yaml("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == _yaml("kuberay/raycluster.yaml")["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "catalog_tagger.cli"]
    assert importlib.util.find_spec(argv[2]) is not None
    commands = typer.main.get_command(app).commands
    assert argv[3] in commands
    known = {o for p in commands[argv[3]].params for o in p.opts}
    assert {a for a in argv if a.startswith("--")} <= known


def test_k8s_work_pool_template() -> None:
    tpl = json.loads((DEPLOY / "k8s-work-pool.json").read_text())
    props = tpl["variables"]["properties"]
    placeholders = set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(tpl["job_configuration"])))
    assert placeholders <= set(props), f"undefined variables: {placeholders - set(props)}"
    manifest = tpl["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "prefect-job" and container["image"] == "{{ image }}"
    assert container["envFrom"] == [{"secretRef": {"name": "{{ storage_secret }}", "optional": True}}]
    assert "catalog-tagger-worker" in props["image"]["default"]
    assert not any(re.search(r"SECRET|KEY|TOKEN|PASSWORD", k) for k in props["env"]["default"])


# --------------------------------------------------------------------------------------------- scripts, docs, secrets
def test_local_script_and_make_target() -> None:
    script = DEPLOY / "local.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in (
        "server start --host 127.0.0.1",
        "/health",
        "work-pool create",
        "--no-prompt deploy --prefect-file deploy/prefect.yaml --all",
        "worker start --pool",
    ):
        assert needle in text, needle
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^deploy-local:.*\n\t.*deploy/local\.sh", makefile, flags=re.M)


SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),  # AWS access key id
    re.compile(r"(?i)aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?(?!\{\{)[A-Za-z0-9/+=]{40}"),
    re.compile(r"(?i)(secret|password|token|api_?key)[\"']?\s*[:=]\s*[\"']?(?!\{\{)[A-Za-z0-9/+=_\-]{16,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bpnu_[A-Za-z0-9]{20,}"),  # Prefect Cloud API key
]


def _scanned_files() -> list[Path]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    return [*files, ROOT / "docs" / "nightly.md"]


@pytest.mark.parametrize("path", _scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_literal_secrets(path: Path) -> None:
    text = path.read_text()
    for pat in SECRET_PATTERNS:
        assert not pat.search(text), f"{path.relative_to(ROOT)}: looks like a literal secret: {pat.pattern}"


def test_secret_scan_catches_a_planted_key() -> None:
    planted = 'env:\n  AWS_ACCESS_KEY_ID: "AKIAABCDEFGHIJKLMNOP"\n  AWS_SECRET_ACCESS_KEY: "' + "a" * 40 + '"\n'
    assert sum(bool(p.search(planted)) for p in SECRET_PATTERNS) >= 2
