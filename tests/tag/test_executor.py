"""The in-process executor runs the same stages as the Ray pipeline: same committed rows, same error rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from modelkit import committed_rows

from catalog_tagger.synthetic.catalog import write_bad_images
from catalog_tagger.tag.job import TagJobConfig, run
from catalog_tagger.tag.resources import choose_executor

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=12, seed=3, min_size=200, max_size=300, name="executor")


@pytest.fixture(scope="module")
def catalog(kit):
    return kit["synth"]


@pytest.fixture(scope="module")
def model(kit):
    return kit["model"]


def _run(model: str, source: str, out: Path, **kw):
    return run(TagJobConfig(model=model, source=source, output=str(out), batch_size=4, **kw))


def _assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        if name in ("run_id", "tagged_at"):
            continue
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name == "embedding" or name.endswith(("_score", "_scores")):
            for u, v in zip(x, y, strict=True):
                assert (u is None) == (v is None), name
                if u is not None:
                    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5, err_msg=name)
        else:
            assert x == y, name


def test_local_and_ray_executors_commit_identical_rows(catalog, model, tmp_path):
    src = catalog.out + "/images"
    local = _run(model, src, tmp_path / "local", executor="local")
    ray_ = _run(model, src, tmp_path / "ray", executor="ray")
    assert local.manifest["resources"]["executor"] == "local"
    assert ray_.manifest["resources"]["executor"] == "ray"
    assert local.ok == ray_.ok == 12
    assert local.manifest["counts"] == ray_.manifest["counts"]
    assert local.manifest["savings"]["method"] == "calibrated" and local.manifest["savings"]["single_task_accel_s"] > 0
    _assert_same_rows(committed_rows(tmp_path / "local"), committed_rows(tmp_path / "ray"))


def test_auto_picks_local_for_a_small_local_run_and_ray_above_the_limit(catalog, model, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    src = catalog.out + "/images"
    small = _run(model, src, tmp_path / "small", device="cpu")
    assert small.manifest["resources"]["executor"] == "local"
    big = _run(model, src, tmp_path / "big", device="cpu", local_max_images=5)
    assert big.manifest["resources"]["executor"] == "ray"
    _assert_same_rows(committed_rows(tmp_path / "small"), committed_rows(tmp_path / "big"))


def test_auto_rules():
    cfg = dict(model="m", source="s", output="o", device="cpu")
    assert choose_executor(TagJobConfig(**cfg), 10) == "local"
    assert choose_executor(TagJobConfig(**cfg, ray_address="local"), 10) == "local"
    assert choose_executor(TagJobConfig(**cfg), 2001) == "ray"
    assert choose_executor(TagJobConfig(**cfg, ray_address="auto"), 10) == "ray"
    assert choose_executor(TagJobConfig(**cfg, ray_address="ray://head:10001"), 10) == "ray"
    assert choose_executor(TagJobConfig(**cfg, executor="local"), 10**6) == "local"
    assert choose_executor(TagJobConfig(**cfg, executor="ray"), 1) == "ray"


def test_auto_follows_ray_address_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert choose_executor(TagJobConfig(model="m", source="s", output="o", device="cpu"), 10) == "ray"


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_bad_images_become_error_rows(model, tmp_path, executor):
    expected = write_bad_images(tmp_path / "bad")
    res = _run(model, str(tmp_path / "bad"), tmp_path / "out", executor=executor)
    rows = committed_rows(tmp_path / "out")
    got = {
        Path(u).name: s for u, s in zip(rows.column("uri").to_pylist(), rows.column("status").to_pylist(), strict=True)
    }
    assert {k: v for k, v in got.items() if k in expected} == expected
    assert res.error == sum(v == "error" for v in expected.values())
    assert res.manifest["resources"]["executor"] == executor
    errors = [
        e
        for e, s in zip(rows.column("error").to_pylist(), rows.column("status").to_pylist(), strict=True)
        if s == "error"
    ]
    assert all(e for e in errors)
