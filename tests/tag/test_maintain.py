"""``maintain``: catch-up of latest, staging cleanup, compaction, vacuum within the retention, checkpoints; on real
Delta tables read back through the log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import outputkit as kit
import pytest

from catalog_tagger.errors import UserError
from catalog_tagger.tag import delta, latest, writer
from catalog_tagger.tag.maintain import maintain

DAY_S = 24 * 3600


def _uris(prefix: str, n: int) -> list[str]:
    return [f"/catalog/{prefix}-{i}.jpg" for i in range(n)]


def _history_rows(out: str, opts: dict | None = None) -> int:
    table = delta.open_table(delta.table_uri(out, delta.PREDICTIONS), delta.delta_options(out, opts))
    assert table is not None
    return delta.dataset(table).count_rows()


def _age(out: Path, staged: writer.StagedFile, run_id: str, days: float) -> None:
    """Make a staged file (and its sidecar) look ``days`` old."""
    then = time.time() - days * DAY_S
    sidecar = Path(writer.sidecar_uri(str(out), run_id, Path(staged.path).stem))
    for path in (out / "predictions" / staged.path, sidecar):
        os.utime(path, (then, then))


def test_maintain_catches_up_compacts_vacuums_and_checkpoints(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    for i in range(3):
        kit.commit_v2_run(out, f"r{i}", kit.rows(_uris(f"b{i}", 5), f"r{i}"))
    latest.catch_up(out, None, runs=None)
    kit.commit_v2_run(out, "r3", kit.rows(_uris("b0", 5), "r3", color="blue"))  # committed, never merged (crash)
    before = sorted(p.name for p in (tmp_path / "out" / "predictions" / "run_date=2024-05-01").iterdir())
    assert len(before) == 4

    report = maintain(out, None, retention_hours=0)

    assert report.merged_runs == ["r3"]
    assert sorted(report.staging_removed) == ["r0", "r1", "r2", "r3"]  # committed: staging is no longer needed
    assert not (tmp_path / "out" / "_staging").exists() or not list((tmp_path / "out" / "_staging").iterdir())
    pred, lat = report.tables
    assert (pred.name, pred.files_compacted, pred.files_written) == ("predictions", 4, 1)
    assert sorted(Path(p).name for p in pred.vacuumed) == before  # the compacted files went (retention 0)
    after = sorted(p.name for p in (tmp_path / "out" / "predictions" / "run_date=2024-05-01").iterdir())
    assert len(after) == 1 and after[0] not in before
    assert _history_rows(out) == 20  # every run's rows, once, through the log and a plain folder read alike
    for name in ("predictions", "latest"):
        assert (tmp_path / "out" / name / "_delta_log" / "_last_checkpoint").exists()
    current = latest.state(out, None)
    assert current is not None
    colors = dict(zip(*current.to_table(columns=["uri", "color"]).to_pydict().values(), strict=True))
    assert len(colors) == 15 and colors["/catalog/b0-0.jpg"] == "blue"  # r3 merged over r0
    assert lat.name == "latest" and lat.version is not None
    assert not (tmp_path / "out" / "_locks" / "commit.lock").exists()  # the lock was released

    again = maintain(out, None, retention_hours=0)  # nothing left to do
    assert again.merged_runs == [] and again.staging_removed == [] and again.tables[0].vacuumed == []


def test_retention_keeps_runs_in_flight_and_clears_abandoned_ones(tmp_path: Path) -> None:
    out_path = tmp_path / "out"
    out = str(out_path)
    kit.commit_v2_run(out, "done", kit.rows(_uris("a", 4), "done"))
    live = kit.stage_v2_file(out, "live", kit.rows(_uris("live", 3), "live"))  # a run writing right now
    old = kit.stage_v2_file(out, "old", kit.rows(_uris("old", 3), "old"))  # crashed 10 days ago
    _age(out_path, old, "old", 10)
    first = kit.stage_v2_file(out, "resumed", kit.rows(_uris("r1", 3), "resumed"))  # first attempt, 9 days ago
    _age(out_path, first, "resumed", 9)
    second = kit.stage_v2_file(out, "resumed", kit.rows(_uris("r2", 3), "resumed"))  # resumed today

    dry = maintain(out, None, dry_run=True)  # default retention: one week
    assert sorted(Path(p).name for p in dry.tables[0].vacuumed) == sorted(Path(f.path).name for f in (old, first))
    assert dry.staging_removed == ["done", "old"] and dry.unstaged_files == [first.path]
    assert (out_path / "_staging" / "old").exists() and (out_path / "predictions" / old.path).exists()
    assert dry.tables[0].files_compacted == 0  # a dry run writes nothing

    report = maintain(out, None)

    assert report.staging_removed == ["done", "old"]
    assert sorted(report.tables[0].vacuumed) == sorted([old.path, first.path])
    assert report.unstaged_files == [first.path]
    for kept in (live, second):  # in flight: data file and sidecar untouched
        assert (out_path / "predictions" / kept.path).exists()
    assert [f.path for f in writer.staged_files(out, "live", None)] == [live.path]
    assert [f.path for f in writer.staged_files(out, "resumed", None)] == [second.path]  # the old one re-tags
    assert not (out_path / "predictions" / old.path).exists() and not (out_path / "_staging" / "old").exists()
    assert _history_rows(out) == 4


def test_maintain_refuses_a_v1_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    kit.write_v1_run(out, "r1", [kit.rows(_uris("a", 2), "r1")], run_date="2024-05-01", finished_at="2024-05-01")
    with pytest.raises(UserError, match=r"v1 layout.*catalog-tagger migrate --output"):
        maintain(str(out), None)


def test_maintain_on_an_empty_output_does_nothing(tmp_path: Path) -> None:
    report = maintain(str(tmp_path / "new"), None)
    assert report.tables == [] and not (tmp_path / "new").exists()


def test_negative_retention_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="retention"):
        maintain(str(tmp_path), None, retention_hours=-1)


def test_maintain_cli(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    for i in range(2):
        kit.commit_v2_run(out, f"r{i}", kit.rows(_uris(f"c{i}", 3), f"r{i}"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "catalog_tagger.cli", "maintain", "--output", out, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    dry = cli("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "latest: 2 committed run(s) would be merged" in dry.stdout
    assert "staging: 2 folder(s) would be removed" in dry.stdout
    assert delta.open_table(delta.table_uri(out, delta.LATEST), None) is None  # the dry run wrote nothing

    done = cli("--retention-hours", "0")
    assert done.returncode == 0, done.stderr
    assert "latest: 2 committed run(s) merged" in done.stdout
    assert "predictions: 2 file(s) compacted into 1, 2 file(s) vacuumed" in done.stdout
    bad = cli("--retention-hours", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_nightly_maintenance_failure_never_fails_the_night(tmp_path: Path) -> None:
    """The nightly flow's maintain step: a result on a v2 output; on failure a warning and None, the flow completes."""
    from types import SimpleNamespace

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows import nightly

    good = str(tmp_path / "good")
    kit.commit_v2_run(good, "r0", kit.rows(_uris("n", 2), "r0"))
    bad = tmp_path / "bad"
    kit.write_v1_run(bad, "r1", [kit.rows(_uris("a", 2), "r1")], run_date="2024-05-01", finished_at="2024-05-01")

    @flow(persist_result=False)
    def night(output: str) -> dict | None:
        return nightly._maintain(SimpleNamespace(output=output, storage_options=None))

    with prefect_test_harness(server_startup_timeout=120):
        assert night(good)["merged_runs"] == ["r0"]
        assert night(str(bad)) is None  # UserError (v1 layout): logged, not raised


@pytest.mark.integration
def test_maintain_on_s3(s3_bucket) -> None:
    """The same upkeep through delta-rs's object store on S3 (moto's server): merge, compact, vacuum, checkpoint."""
    import s3fs

    bucket, opts = s3_bucket
    out = f"s3://{bucket}/out"
    for i in range(2):
        kit.commit_v2_run(out, f"r{i}", kit.rows(_uris(f"b{i}", 5), f"r{i}"), storage_options=opts)
    report = maintain(out, opts, retention_hours=0)
    assert report.merged_runs == ["r0", "r1"] and sorted(report.staging_removed) == ["r0", "r1"]
    pred = report.tables[0]
    assert (pred.files_compacted, pred.files_written, len(pred.vacuumed)) == (2, 1, 2)
    assert _history_rows(out, opts) == 10
    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    assert len(fs.glob(f"{bucket}/out/predictions/run_date=*/*.parquet")) == 1  # the compacted file only
    assert fs.exists(f"{bucket}/out/predictions/_delta_log/_last_checkpoint")
    current = latest.state(out, opts)
    assert current is not None and current.count_rows() == 10
