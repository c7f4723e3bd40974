"""Layout detection, the v1 refusal, and ``migrate`` from a hand-made v1 output to Delta tables (read back through
the log), including a crash part-way and a rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import outputkit as kit
import pyarrow as pa
import pytest

from catalog_tagger.errors import UserError
from catalog_tagger.tag import delta, latest, migrate

DAY1, DAY2 = "2024-05-01", "2024-05-02"


def _uris(prefix: str, n: int) -> list[str]:
    return [f"/catalog/{prefix}-{i}.jpg" for i in range(n)]


def _v1_output(out: Path) -> None:
    """Two v1 runs (the second re-tags 2 images of the first and adds 1) plus a v1 staging leftover."""
    kit.write_v1_run(
        out,
        "night1",
        [kit.rows(_uris("a", 3), "night1"), kit.rows(_uris("b", 2), "night1")],
        run_date=DAY1,
        finished_at="2024-05-01T02:10:00.000+00:00",
    )
    kit.write_v1_run(
        out,
        "night2",
        [kit.rows([*_uris("a", 2), "/catalog/c-0.jpg"], "night2", color="blue")],
        run_date=DAY2,
        finished_at="2024-05-02T02:10:00.000+00:00",
    )
    (out / "_staging" / "crashed").mkdir(parents=True)
    (out / "_staging" / "crashed" / "part-00000.parquet").write_bytes(b"v1 staged part")


def _history(out: Path):
    table = delta.open_table(delta.table_uri(str(out), delta.PREDICTIONS), None)
    assert table is not None
    return table


def test_layout_version(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert migrate.layout_version(str(out), None) is None  # nothing there
    out.mkdir()
    assert migrate.layout_version(str(out), None) is None  # empty
    _v1_output(out)
    assert migrate.layout_version(str(out), None) == 1
    v2 = tmp_path / "v2"
    kit.commit_v2_run(str(v2), "r1", kit.rows(_uris("a", 2), "r1"))
    assert migrate.layout_version(str(v2), None) == 2
    migrate.refuse_old_layout(str(v2), None)  # no error


def test_v1_output_is_refused_with_the_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _v1_output(out)
    with pytest.raises(UserError, match=rf"output {out} is in the v1 layout.*catalog-tagger migrate --output {out}"):
        migrate.refuse_old_layout(str(out), None)


def test_migrate_commits_each_run_once_and_keeps_the_v1_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _v1_output(out)

    report = migrate.migrate(str(out), None)

    assert report.runs_migrated == ["night1", "night2"] and report.runs_already == [] and report.rows == 8
    assert migrate.layout_version(str(out), None) == 2
    history = _history(out)
    runs = delta.all_runs(history)
    assert [r.run_id for r in runs] == ["night1", "night2"]  # oldest first, one commit each
    assert [r.manifest["files"] for r in runs] == [2, 1]  # v2 manifests: the count, the commit names the files
    assert all("migrated from the v1 layout" in r.manifest["notes"][-1] for r in runs)
    rows = delta.dataset(history).to_table()
    assert rows.num_rows == 8
    assert rows.schema.field("embedding").type == pa.list_(pa.field("element", pa.float32()))
    assert sorted({str(d) for d in rows.column("run_date").to_pylist()}) == [DAY1, DAY2]
    assert rows.filter(pa.compute.equal(rows["uri"], "/catalog/b-1.jpg"))["embedding"].to_pylist() == [[1.0] * 4]
    # latest: one row per image, the newer run winning
    current = latest.state(str(out), None).to_table(columns=["uri", "color", "run_id"]).to_pylist()
    by_uri = {r["uri"]: r for r in current}
    assert len(by_uri) == len(current) == 6
    assert by_uri["/catalog/a-0.jpg"]["color"] == "blue" and by_uri["/catalog/b-0.jpg"]["run_id"] == "night1"
    # the v1 files are kept aside, runs/ holds the v2 derived copies
    backup = out / "_v1_backup"
    assert (backup / "predictions" / f"run_date={DAY1}" / "run_id=night1" / "part-00001.parquet").exists()
    assert (backup / "_staging" / "crashed" / "part-00000.parquet").exists()
    assert json.loads((backup / "runs" / "night1.json").read_text())["files"]
    assert json.loads((out / "runs" / "night1.json").read_text()) == runs[0].manifest  # the v2 derived copy
    assert not list((out / "predictions").glob("run_date=*/run_id=*"))
    assert not list((out / "_staging").glob("*")) and not (out / migrate.MARKER).exists()
    assert report.v1_folders_moved == 2

    again = migrate.migrate(str(out), None)  # v2 now: nothing to do
    assert again.was_v2 and _history(out).version() == history.version()


def test_a_crashed_migration_is_refused_then_finished_by_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _v1_output(out)
    real = migrate._backup_and_rewrite

    def crash_after_first(*args: object) -> None:
        real(*args)
        raise KeyboardInterrupt  # killed after the first run's commit

    monkeypatch.setattr(migrate, "_backup_and_rewrite", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        migrate.migrate(str(out), None)
    assert migrate.layout_version(str(out), None) == 1  # half-migrated still counts as v1: refused everywhere
    assert [r.run_id for r in delta.all_runs(_history(out))] == ["night1"]

    monkeypatch.setattr(migrate, "_backup_and_rewrite", real)
    report = migrate.migrate(str(out), None)

    assert report.runs_migrated == ["night2"]
    assert [r.run_id for r in delta.all_runs(_history(out))] == ["night1", "night2"]
    assert delta.dataset(_history(out)).count_rows() == 8  # night1 not committed twice
    assert migrate.layout_version(str(out), None) == 2


def test_a_committed_run_is_skipped(tmp_path: Path) -> None:
    """A run committed by an earlier attempt whose manifest was not rewritten yet (crash in between)."""
    out = tmp_path / "out"
    _v1_output(out)
    first = migrate.migrate(str(out), None)
    assert first.runs_migrated == ["night1", "night2"]
    backup = out / "_v1_backup" / "runs" / "night2.json"
    (out / "runs" / "night2.json").write_text(backup.read_text())  # as if the rewrite had not happened
    (out / migrate.MARKER).write_text("{}")

    report = migrate.migrate(str(out), None)

    assert report.runs_already == ["night2"] and report.runs_migrated == []
    assert delta.dataset(_history(out)).count_rows() == 8


def test_nothing_to_migrate(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to migrate"):
        migrate.migrate(str(tmp_path / "empty"), None)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_migrate_cli(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _v1_output(out)
    refused = _cli("maintain", "--output", str(out))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"catalog-tagger migrate --output {out}" in " ".join(refused.stderr.split())

    done = _cli("migrate", "--output", str(out))

    assert done.returncode == 0, done.stderr
    assert "2 run(s) committed to predictions (0 already), 8 row(s)" in done.stdout
    assert "_v1_backup" in done.stdout
    again = _cli("migrate", "--output", str(out))
    assert again.returncode == 0 and "already in the Delta (v2) layout" in again.stdout
    empty = _cli("migrate", "--output", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "nothing to migrate" in empty.stderr and "Traceback" not in empty.stderr
