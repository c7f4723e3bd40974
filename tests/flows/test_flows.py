"""Prefect flows: parameter validation, retry policy, resumable run ids, and the savings artifacts read back."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest
import savingskit

from catalog_tagger.accounting import Pricing
from catalog_tagger.errors import ConfigError, RayJobFailed, UserError
from catalog_tagger.figures import SAVINGS_RECORDS
from catalog_tagger.storage import is_transient
from catalog_tagger.tag import job as tag_job
from flows import nightly
from flows.artifacts import artifact_key, output_slug, savings_table, summary_markdown
from flows.nightly import backfill, nightly_tagging
from flows.params import NightlyParams, TrainParams
from flows.train import train_model


# --------------------------------------------------------------------------------------------- no server needed
def test_flow_signature_matches_params_model() -> None:
    """The flow's flat parameters (for `-p name=value`) and NightlyParams must not drift apart."""
    assert list(inspect.signature(nightly_tagging.fn).parameters) == list(NightlyParams.model_fields)
    assert set(inspect.signature(backfill.fn).parameters) == set(NightlyParams.model_fields) - {"full"}
    assert list(inspect.signature(train_model.fn).parameters) == list(TrainParams.model_fields)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"price_per_hour": -1}, "price_per_hour"),
        ({"limit": 0}, "limit"),
        ({"source": "  "}, "source"),
        ({"model": "{{ $CATALOG_TAGGER_MODEL }}"}, "model"),
        ({"ray_address": "ftp://head:1"}, "ray_address"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_nightly_params_name_the_bad_field(values: dict[str, Any], field: str) -> None:
    base = {"source": "s3://b/img", "output": "s3://b/out", "model": "s3://b/model"}
    with pytest.raises(ConfigError, match=rf"parameter {field}:"):
        NightlyParams.parse("nightly_tagging", **{**base, **values})


def test_nightly_params_defaults_win_over_none() -> None:
    p = NightlyParams.parse("x", source="a", output="b", model="c", batch_size=None, ray_address="http://h:8265")
    assert p.batch_size == 64 and p.ray_address == "http://h:8265"
    cfg = p.job_config("nightly-20260101-abcdef12")
    assert cfg.run_id == "nightly-20260101-abcdef12" and cfg.storage_options is None


def test_train_params_use_the_library_checks() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        TrainParams.parse("train_model", tasks="t.yaml", labels="l.parquet", out="m", epochs=0).train_config()


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError(), True),
        (OSError("s3 503 SlowDown"), True),
        (FileNotFoundError("model.json"), False),
        (PermissionError("denied"), False),
        (UserError("bad model"), False),
        (ValueError("bug"), False),
        (RayJobFailed("x", status="FAILED", submission_id="s", retryable=True), True),
        (RayJobFailed("x", status="STOPPED", submission_id="s", retryable=False), False),
        (type("ActorDiedError", (Exception,), {})(), True),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_user_error_wins_over_a_transient_cause() -> None:
    try:
        try:
            raise ConnectionError("probe failed")
        except ConnectionError as err:
            raise UserError("output not writable") from err
    except UserError as exc:
        assert not is_transient(exc)


def test_savings_table_carries_every_number_raw() -> None:
    savings = savingskit.savings(pricing=Pricing(cpu_core_per_hour=0.04))
    rows = savings_table(savings)
    assert {r["key"]: r["value"] for r in rows} == {k: v for k, v in savings.items() if k not in SAVINGS_RECORDS}
    assert all(r["metric"] for r in rows) and len({r["metric"] for r in rows}) == len(rows)


def test_artifact_keys_are_per_output_and_stable() -> None:
    a, b = "s3://bucket/catalogs/museum/out", "s3://bucket/catalogs/shop/out"
    assert artifact_key("nightly", "savings", a) != artifact_key("nightly", "savings", b)
    assert artifact_key("nightly", "savings", a) == artifact_key("nightly", "savings", a + "/")
    assert output_slug(a) == "museum-out-" + output_slug(a).rsplit("-", 1)[1]  # readable tail + hash
    # same tail, other bucket: still two keys; no credentials or query strings in a key
    assert output_slug("s3://other/catalogs/museum/out") != output_slug(a)
    assert "secret" not in output_slug("s3://user:secret@b/out?sig=secret")
    for out in (a, "/tmp/x", "/", "C:\\Data\\Ünïcode Out", "gs://b/" + "x" * 300):
        key = artifact_key("backfill", "summary", out)
        assert re.fullmatch(r"[a-z0-9-]+", key) and len(key) <= 64, key


def test_summary_markdown_without_a_commit() -> None:
    result = {
        "run_id": "r",
        "listed": 3,
        "unchanged": 3,
        "ok": 0,
        "error": 0,
        "wall_s": 0.1,
        "manifest": None,
        "output": "o",
        "notes": ["nothing to do"],
    }
    md = summary_markdown("nightly", result, None, "local", "2026-01-01")
    assert "Nothing was committed" in md and "HTML report" not in md


# --------------------------------------------------------------------------------------------- flows on Prefect
@pytest.fixture(scope="module")
def catalog(catalog_kit) -> dict[str, str]:
    kit = catalog_kit(name="flows")
    return kit


@pytest.fixture
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same retry policy, no backoff sleep (the flow body looks the tasks up at call time)."""
    for name in ("check_inputs", "tag_catalog", "write_html_report"):
        monkeypatch.setattr(nightly, name, getattr(nightly, name).with_options(retry_delay_seconds=0))


def _artifact(key: str):
    from prefect.artifacts import Artifact

    art = Artifact.get(key)
    assert art is not None, f"no artifact {key!r}"
    return art


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness")
def test_bad_parameters_fail_the_flow_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    touched: list[str] = []
    monkeypatch.setattr(tag_job, "validate", lambda _cfg: touched.append("validate"))
    monkeypatch.setattr(tag_job, "run", lambda _cfg, **_kw: touched.append("run"))
    state = nightly_tagging(
        source="", output=str(tmp_path), model="m", batch_size=0, ray_address="ftp://x", return_state=True
    )
    assert state.is_failed()
    for field in ("source", "batch_size", "ray_address"):
        assert f"parameter {field}:" in state.message
    assert touched == []
    assert _task_runs(state.state_details.flow_run_id) == []


@pytest.fixture(scope="module")
def flaky_night(harness, ray_local, catalog) -> dict[str, Any]:  # noqa: ARG001 - harness, ray_local: running
    """One nightly run whose library call fails once with a ConnectionError, then runs for real."""
    calls: list[tag_job.TagJobConfig] = []
    real_run = tag_job.run

    def flaky(cfg, progress=None):
        calls.append(cfg)
        if len(calls) == 1:
            raise ConnectionError("injected: object store connection reset")
        return real_run(cfg, progress=progress)

    output = str(Path(catalog["root"]) / "out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tag_job, "run", flaky)
        mp.setattr(nightly, "tag_catalog", nightly.tag_catalog.with_options(retry_delay_seconds=0))
        state = nightly_tagging(source=catalog["source"], output=output, model=catalog["model"], return_state=True)
    return {"state": state, "calls": calls, "output": output}


@pytest.mark.slow
@pytest.mark.integration
def test_transient_error_is_retried_and_resumes_the_same_run_id(flaky_night) -> None:
    state, calls = flaky_night["state"], flaky_night["calls"]
    assert state.is_completed(), state.message
    assert len(calls) == 2
    run_ids = {c.run_id for c in calls}
    assert len(run_ids) == 1
    flow_run_id = str(state.state_details.flow_run_id).replace("-", "")
    assert re.fullmatch(rf"nightly-\d{{8}}-{flow_run_id[:8]}", run_ids.pop())
    result = state.result()
    assert result["ok"] == 20 and result["manifest"]["counts"]["rows"] == 20
    rows = pads.dataset(str(Path(flaky_night["output"]) / "predictions"), format="parquet").count_rows()
    assert rows == 20


@pytest.mark.slow
@pytest.mark.integration
def test_artifacts_carry_the_manifest_savings(flaky_night) -> None:
    state = flaky_night["state"]
    result = state.result()
    manifest = json.loads((Path(flaky_night["output"]) / "runs" / f"{result['run_id']}.json").read_text())
    table = _artifact(artifact_key("nightly", "savings", flaky_night["output"]))
    assert table.type == "table" and table.flow_run_id == state.state_details.flow_run_id
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["key"]: r["value"] for r in rows} == {
        k: v for k, v in manifest["savings"].items() if k not in SAVINGS_RECORDS
    }
    summary = _artifact(artifact_key("nightly", "summary", flaky_night["output"]))
    assert summary.type == "markdown" and result["run_id"] in summary.data
    assert result["report"] and Path(result["report"]).exists()
    assert result["report"] in summary.data


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness", "no_retry_wait")
def test_user_error_is_not_retried(catalog, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls: list[str] = []

    def refuse(cfg, **_kw):
        calls.append(cfg.run_id)
        raise UserError("source 's3://nope' does not exist or is not readable")

    monkeypatch.setattr(tag_job, "run", refuse)
    state = nightly_tagging(source=catalog["source"], output=str(tmp_path), model=catalog["model"], return_state=True)
    assert state.is_failed() and "does not exist" in state.message
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness", "no_retry_wait")
def test_bad_model_is_refused_by_check_inputs_without_retry(monkeypatch, tmp_path) -> None:
    ran: list[str] = []
    monkeypatch.setattr(tag_job, "run", lambda _cfg, **_kw: ran.append("run"))
    state = nightly_tagging(source=str(tmp_path), output=str(tmp_path / "o"), model=str(tmp_path), return_state=True)
    assert state.is_failed() and ran == []
    [check] = [t for t in _task_runs(state.state_details.flow_run_id) if t.name.startswith("check-inputs")]
    assert check.run_count == 1 and check.state.is_failed()


@pytest.mark.slow
@pytest.mark.integration
def test_backfill_retags_everything(flaky_night, catalog) -> None:
    state = backfill(source=catalog["source"], output=flaky_night["output"], model=catalog["model"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["run_id"].startswith("backfill-") and result["ok"] == 20 and result["unchanged"] == 0
    assert result["manifest"]["incremental"] is False
    savings = _artifact(artifact_key("backfill", "savings", flaky_night["output"]))
    assert savings.flow_run_id == state.state_details.flow_run_id


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness")
def test_train_model_flow(catalog, tmp_path) -> None:
    state = train_model(
        tasks=catalog["tasks"],
        labels=catalog["labels"],
        out=str(tmp_path / "trained"),
        backbone="tiny_cnn",
        image_size=32,
        epochs=1,
        batch_size=8,
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()
    assert (tmp_path / "trained" / "model.json").exists() and result["model_version"]
    assert _artifact("train-metrics").flow_run_id == state.state_details.flow_run_id


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness", "ray_local")
def test_run_local_demo_runs_two_nights(catalog, tmp_path) -> None:
    from catalog_tagger.tag.job import RunResult

    added: list[bool] = []
    first, second = nightly.run_local_demo(
        catalog["source"], str(tmp_path / "out"), catalog["model"], between=lambda: added.append(True)
    )
    assert isinstance(first, RunResult) and isinstance(second, RunResult) and added == [True]
    assert (first.ok, first.processed) == (20, 20) and first.manifest is not None
    assert (second.processed, second.unchanged) == (0, 20) and second.manifest is None
    assert first.run_id != second.run_id
