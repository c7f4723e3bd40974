"""The error budget on Prefect: a night over it commits its rows, publishes its artifacts, then ends Failed naming
the count, and emits the over-error-budget event (drift emits its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable

from catalog_tagger.synthetic.catalog import write_bad_images
from catalog_tagger.tag.health import health_record
from flows import nightly
from flows.artifacts import artifact_key, output_slug
from flows.nightly import EVENT_DRIFT, EVENT_OVER_BUDGET, nightly_tagging


class _Recorder:
    """Wraps ``emit_event``: records each call and what the real one returned."""

    def __init__(self, real: Any = None) -> None:
        self.real, self.calls = real, []

    def __call__(self, **kwargs: Any) -> Any:
        emitted = self.real(**kwargs) if self.real is not None else None
        self.calls.append({**kwargs, "emitted": emitted})
        return emitted


def test_health_record_statuses() -> None:
    assert health_record(0, 0, 0.05, [])["status"] == "ok"
    assert health_record(10, 200, 0.05, [])["status"] == "ok"  # exactly at the budget is within it
    over = health_record(12, 200, 0.05, [{"task": "color", "message": "color drifted"}])
    assert over["status"] == "failed" and over["error_fraction"] == 0.06
    assert over["warnings"] == ["12 of 200 images (6.0%) failed, over the 5.0% error budget", "color drifted"]
    assert health_record(1, 200, 0.05, [{"task": "color", "message": "m"}])["status"] == "warning"


def test_drift_emits_its_event_without_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(nightly, "emit_event", rec)
    drift = [{"task": "color", "psi": 0.4, "mean_confidence": 0.5, "previous_mean_confidence": 0.7, "message": "m"}]
    manifest = {"counts": {"rows": 100, "error": 0}, "health": health_record(0, 100, 0.05, drift)}
    result = {"manifest": manifest, "output": "s3://u:secret@bucket/out", "run_id": "r1"}
    assert nightly._health_verdict(result, None) is None
    [call] = rec.calls
    assert call["event"] == EVENT_DRIFT and call["payload"]["drift"] == drift
    assert call["resource"] == {"prefect.resource.id": f"catalog-tagger.output.{output_slug(result['output'])}"}
    assert "secret" not in str(call)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness")
def test_over_budget_night_commits_then_fails_naming_the_count(catalog_kit, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.artifacts import Artifact

    kit = catalog_kit(images=8, name="budget")
    bad = write_bad_images(kit["source"])
    errors, total = sum(v == "error" for v in bad.values()), 8 + len(bad)
    output = str(Path(kit["root"]) / "out")
    rec = _Recorder(nightly.emit_event)
    monkeypatch.setattr(nightly, "emit_event", rec)
    state = nightly_tagging(
        source=kit["source"], output=output, model=kit["model"], executor="local", max_error_fraction=0.1,
        return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    assert f"{errors} of {total} images ({errors / total:.1%}) failed, over the 10.0% error budget" in state.message
    assert "see the run report" in state.message and str(Path(output) / "report") in state.message
    # the rows are committed, and the artifacts were published before the flow failed
    table = DeltaTable(str(Path(output) / "predictions")).to_pyarrow_table(columns=["status"])
    assert table.num_rows == total and table.column("status").to_pylist().count("error") == errors
    savings = Artifact.get(artifact_key("nightly", "savings", output))
    assert savings is not None and savings.flow_run_id == state.state_details.flow_run_id
    [call] = [c for c in rec.calls if c["event"] == EVENT_OVER_BUDGET]
    assert call["emitted"] is not None  # the real emit_event sent it (None: events were off)
    assert call["resource"]["prefect.resource.id"] == f"catalog-tagger.output.{output_slug(output)}"
    assert (call["payload"]["error"], call["payload"]["rows"], call["payload"]["max_error_fraction"]) == (
        errors,
        total,
        0.1,
    )
