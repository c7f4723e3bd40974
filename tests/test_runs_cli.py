"""`catalog-tagger runs`: one line per committed run, oldest first, figures equal to the run manifests."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from outputkit import rows as kit_rows
from outputkit import write_v1_run

from catalog_tagger.cli_runs import run_rows
from catalog_tagger.synthetic.catalog import write_bad_images
from catalog_tagger.tag.job import TagJobConfig, run


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "catalog_tagger.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def three_runs(catalog_kit, tmp_path_factory) -> dict[str, Any]:
    """Three committed runs: 4 images, 4 more, then the awkward-image set (over the 5% error budget)."""
    kit = catalog_kit(images=8, name="runs")
    src = tmp_path_factory.mktemp("runs-src") / "images"
    src.mkdir()
    images = sorted(Path(kit["source"]).iterdir())
    out = str(tmp_path_factory.mktemp("runs-out") / "out")
    base = dict(model=kit["model"], source=str(src), output=out, executor="local", batch_size=8)
    results = []
    for batch in (images[:4], images[4:]):
        for p in batch:
            shutil.copy(p, src / p.name)
        results.append(run(TagJobConfig(**base)))
    expected = write_bad_images(src)
    results.append(run(TagJobConfig(**base)))
    return {"out": out, "results": results, "bad": expected}


@pytest.mark.slow
def test_runs_table_json_and_csv_follow_the_manifests(three_runs) -> None:
    out, results = three_runs["out"], three_runs["results"]
    assert [r.manifest is not None for r in results] == [True, True, True]
    assert [r.manifest["health"]["status"] for r in results] == ["ok", "ok", "failed"]  # type: ignore[index]

    proc = _cli("runs", "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [x["run_id"] for x in lines] == [r.run_id for r in results]  # oldest first
    for line, r in zip(lines, results, strict=True):
        m = r.manifest
        assert m is not None
        assert line["listed"] == m["counts"]["listed"] and line["ok"] == m["counts"]["ok"]
        assert line["errors"] == m["counts"]["error"] and line["wall_s"] == m["timings"]["wall_s"]
        assert line["accel_hours_saved"] == m["savings"]["accel_hours_saved"]
        assert line["cost_saved"] == m["savings"]["cost_saved"]
        assert line["model_version"] == m["model_version"] and line["run_date"] == m["run_date"]
    bad = sum(v == "error" for v in three_runs["bad"].values())
    assert [x["errors"] for x in lines] == [0, 0, bad] and [x["status"] for x in lines] == ["ok", "ok", "failed"]

    csv_proc = _cli("runs", "--output", out, "--format", "csv")
    assert csv_proc.returncode == 0, csv_proc.stderr[-2000:]
    parsed = list(csv.DictReader(io.StringIO(csv_proc.stdout)))
    assert [row["run_id"] for row in parsed] == [x["run_id"] for x in lines]
    assert [int(row["errors"]) for row in parsed] == [x["errors"] for x in lines]

    table = _cli("runs", "--output", out)
    assert table.returncode == 0, table.stderr[-2000:]
    header, *body = [ln.split("\t") for ln in table.stdout.splitlines()]  # piped: tab-separated, human units
    assert header[:6] == ["run date", "run id", "model", "listed", "tagged", "errors"] and header[-1] == "status"
    assert [b[1] for b in body] == [r.run_id for r in results] and [b[-1] for b in body] == ["ok", "ok", "failed"]
    assert body[2][5] == str(bad) and body[0][6].endswith(("ms", " s", "min", " h"))


@pytest.mark.slow
def test_runs_refuses_a_missing_or_v1_output(tmp_path) -> None:
    missing = _cli("runs", "--output", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    v1 = tmp_path / "v1"
    write_v1_run(v1, "r1", [kit_rows(["/a.jpg"], "r1")], run_date="2024-05-01", finished_at="2024-05-01T00:00:00")
    old = _cli("runs", "--output", str(v1))
    assert old.returncode == 2 and "catalog-tagger migrate" in old.stderr and "Traceback" not in old.stderr
    bad_format = _cli("runs", "--output", str(v1), "--format", "xml")
    assert bad_format.returncode == 2 and "--format" in bad_format.stderr


def test_old_manifests_show_ok_and_not_priced() -> None:
    """Manifests before version 5 have no health: status ok; cost_saved None stays None (not priced)."""
    old = {"run_id": "r", "run_date": "2024-01-01", "model_version": "v", "counts": {"listed": 3, "ok": 2, "error": 1},
           "timings": {"wall_s": 1.5}, "savings": {"accel_hours_saved": 0.001, "cost_saved": None}}  # fmt: skip
    [row] = run_rows([old]).to_pylist()
    assert row["status"] == "ok" and row["cost_saved"] is None and row["errors"] == 1
    assert row["accel_hours_saved"] == 0.001
