"""Start-up seconds recorded by the executors (``ray_init_s``, ``first_batch_s``), and what a decode or write task
imports: torch belongs to the Predictor actor alone."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import catalog_tagger.tag.job as job
from catalog_tagger.tag.job import TagJobConfig, run

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=10, seed=5, min_size=120, max_size=200, name="startup")


def _spied_run(kit, out, monkeypatch, **kw) -> tuple[dict, float]:
    """Run a job; return the resources ``execute`` returned and the seconds ``execute`` took (the pipeline)."""
    seen: dict = {}
    real = job.execute

    def spy(*args, **kwargs):
        t0 = time.perf_counter()
        resources, totals = real(*args, **kwargs)
        seen.update(resources=dict(resources), pipeline_s=time.perf_counter() - t0)
        return resources, totals

    monkeypatch.setattr(job, "execute", spy)
    res = run(TagJobConfig(model=kit["model"], source=kit["source"], output=str(out), batch_size=4, **kw))
    assert res.ok == 10
    return seen["resources"], seen["pipeline_s"]


def test_ray_run_records_start_up_seconds(kit, tmp_path, monkeypatch):
    resources, pipeline_s = _spied_run(kit, tmp_path / "ray", monkeypatch, executor="ray")
    assert resources["executor"] == "ray"
    assert resources["ray_init_s"] == 0.0  # the session's Ray fixture was already running
    assert 0 < resources["first_batch_s"] <= pipeline_s


def test_local_run_records_first_batch_but_no_ray_init(kit, tmp_path, monkeypatch):
    resources, pipeline_s = _spied_run(kit, tmp_path / "local", monkeypatch, executor="local")
    assert resources["executor"] == "local"
    assert "ray_init_s" not in resources
    assert 0 < resources["first_batch_s"] <= pipeline_s


@pytest.mark.parametrize("module", ["catalog_tagger.tag.reader", "catalog_tagger.tag.writer"])
def test_decode_and_write_stages_do_not_import_torch(module):
    # What a Ray task worker imports to unpickle DecodeStage or PartWriter: a fresh interpreter, like a worker.
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'torchvision', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
