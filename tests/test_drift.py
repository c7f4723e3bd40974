"""Drift: the PSI and its verdicts (drift.py), run profiles over data files (tag/profile.py), and drift on real
tagging runs of a synthetic catalog whose colours change."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_tagger.config import parse_tasks
from catalog_tagger.drift import DriftConfig, detect, profiles_of, psi
from catalog_tagger.tag import writer
from catalog_tagger.tag.profile import NO_LABEL, profile_files


def _task(labels: dict[str, int], *, conf: float | None = 0.8, kind: str = "multiclass") -> dict[str, Any]:
    rows = sum(labels.values())
    return {"kind": kind, "rows": rows, "labels": labels, "mean_confidence": conf, "low_confidence_share": 0.1}


def _profile(**tasks: dict[str, Any]) -> dict[str, Any]:
    return {"tasks": tasks}


BALANCED = {"red": 100, "blue": 100, "green": 100}
SHIFTED = {"red": 220, "blue": 50, "green": 30}


# --------------------------------------------------------------------------------------------- psi
def test_psi_of_identical_distributions_is_zero() -> None:
    assert psi(BALANCED, BALANCED) == pytest.approx(0.0, abs=1e-12)
    assert psi(BALANCED, {k: 3 * v for k, v in BALANCED.items()}) == pytest.approx(0.0, abs=1e-12)  # shares only


def test_psi_of_a_shifted_distribution_is_over_the_warning_level() -> None:
    assert psi(SHIFTED, BALANCED) > 0.2
    assert psi({"red": 105, "blue": 98, "green": 97}, BALANCED) < 0.01  # sampling noise stays far below it


def test_psi_handles_labels_on_one_side_only() -> None:
    value = psi({"red": 50, "purple": 50}, {"red": 100})  # purple: never seen before; smoothed, not infinite
    assert 1.0 < value < 100.0
    assert psi({"red": 100}, {"red": 50, "purple": 50}) == pytest.approx(value)  # symmetric in the two sides
    with pytest.raises(ValueError, match="at least one count"):
        psi({}, BALANCED)


# --------------------------------------------------------------------------------------------- detect
def test_detect_warns_on_a_shift_with_the_figure_and_threshold_in_the_message() -> None:
    [warning] = detect(_profile(color=_task(SHIFTED)), [_profile(color=_task(BALANCED))], DriftConfig())
    assert warning["task"] == "color"
    assert warning["psi"] == pytest.approx(psi(SHIFTED, BALANCED), rel=1e-4)
    assert warning["mean_confidence"] == warning["previous_mean_confidence"] == 0.8
    assert "'color'" in warning["message"] and f"{warning['psi']:.3f}" in warning["message"]
    assert ">= 0.2" in warning["message"]
    assert detect(_profile(color=_task(BALANCED)), [_profile(color=_task(BALANCED))], DriftConfig()) == []


def test_detect_respects_the_psi_threshold() -> None:
    figure = psi(SHIFTED, BALANCED)
    now, before = _profile(color=_task(SHIFTED)), [_profile(color=_task(BALANCED))]
    assert detect(now, before, DriftConfig(psi_warn=figure + 0.01)) == []
    assert len(detect(now, before, DriftConfig(psi_warn=figure - 0.01))) == 1


def test_too_few_rows_give_no_verdict() -> None:
    small = {k: v // 10 for k, v in SHIFTED.items()}  # 30 rows
    assert detect(_profile(color=_task(small)), [_profile(color=_task(BALANCED))], DriftConfig(min_rows=50)) == []
    assert len(detect(_profile(color=_task(small)), [_profile(color=_task(BALANCED))], DriftConfig(min_rows=30))) == 1
    # a previous run too small takes no part: with no other, no verdict
    tiny_before = [_profile(color=_task({"red": 10, "blue": 10}))]
    assert detect(_profile(color=_task(SHIFTED)), tiny_before, DriftConfig(min_rows=50)) == []


def test_detect_pools_the_last_window_of_previous_runs() -> None:
    shifted_runs = [_profile(color=_task(SHIFTED)) for _ in range(3)]
    history = [_profile(color=_task(BALANCED)), *shifted_runs]  # oldest first
    now = _profile(color=_task(SHIFTED))
    assert detect(now, history, DriftConfig(window=3, psi_warn=0.01)) == []  # the balanced run fell out of it
    [warning] = detect(now, history, DriftConfig(window=4, psi_warn=0.01))  # pooled: 1 balanced + 3 shifted
    pooled = {k: BALANCED[k] + 3 * SHIFTED[k] for k in BALANCED}
    assert warning["psi"] == pytest.approx(psi(SHIFTED, pooled), rel=1e-4)


def test_detect_warns_on_a_confidence_drop() -> None:
    before = [_profile(color=_task(BALANCED, conf=0.9)), _profile(color=_task(BALANCED, conf=0.7))]
    [warning] = detect(_profile(color=_task(BALANCED, conf=0.65)), before, DriftConfig(confidence_drop=0.1))
    assert warning["previous_mean_confidence"] == pytest.approx(0.8)  # the previous runs' mean, row-weighted
    assert warning["psi"] == pytest.approx(0.0, abs=1e-9)
    assert "0.800 to 0.650" in warning["message"] and "0.1" in warning["message"]
    assert detect(_profile(color=_task(BALANCED, conf=0.75)), before, DriftConfig(confidence_drop=0.1)) == []
    assert detect(_profile(color=_task(BALANCED, conf=None)), before, DriftConfig()) == []  # nothing to compare


def test_detect_ignores_absent_profiles_other_kinds_and_new_tasks() -> None:
    now = _profile(color=_task(SHIFTED), badges=_task(SHIFTED, kind="multilabel"))
    before: list[Any] = [{}, {"tasks": None}, _profile(color=_task(BALANCED), badges=_task(BALANCED))]
    assert [w["task"] for w in detect(now, before, DriftConfig())] == ["color"]  # badges was multiclass before
    assert detect(now, [], DriftConfig()) == []
    assert detect({}, before, DriftConfig()) == []


def test_profiles_of_manifests_leaves_out_older_runs_without_one() -> None:
    prof = _profile(color=_task(BALANCED))
    assert profiles_of([{"run_id": "old"}, None, {"profile": prof}, {"profile": {"tasks": "?"}}]) == [prof]


# --------------------------------------------------------------------------------------------- profile_files
TASKS = parse_tasks(
    [
        {"name": "color", "kind": "multiclass", "labels": ["red", "blue"]},
        {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo"]},
    ]
)
_FILE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("status", pa.string()),
        ("color", pa.string()),
        ("color_score", pa.float32()),
        ("badges", pa.list_(pa.string())),
        ("badges_scores", pa.list_(pa.float32())),
    ]
)


def _write_files(output: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Two data files of one run: 4 ok rows and an error row (which the profile leaves out)."""
    files = {
        "run_date=2024-01-01/part-a.parquet": [
            ("a", "ok", "red", 0.9, ["sale", "logo"], [0.8, 0.7]),
            ("b", "ok", "red", 0.3, [], [0.2, 0.1]),
            ("e", "error", None, None, None, None),
        ],
        "run_date=2024-01-01/part-b.parquet": [
            ("c", "ok", "blue", 0.6, ["logo"], [0.4, 0.9]),
            ("d", "ok", "red", 0.4, [], [0.3, 0.45]),
        ],
    }
    for rel, rows in files.items():
        table = pa.Table.from_pylist([dict(zip(_FILE_SCHEMA.names, r, strict=True)) for r in rows], _FILE_SCHEMA)
        uri = writer.data_uri(output, rel)
        from catalog_tagger.storage import filesystem, strip

        fs = filesystem(uri, storage_options)
        fs.makedirs(strip(uri).rsplit("/", 1)[0], exist_ok=True)
        with fs.open(strip(uri), "wb") as fh:
            pq.write_table(table, fh)
    return sorted(files)


def _check_profile(prof: dict[str, Any]) -> None:
    color, badges = prof["tasks"]["color"], prof["tasks"]["badges"]
    assert color["kind"] == "multiclass" and color["rows"] == 4
    assert color["labels"] == {"red": 3, "blue": 1}
    assert color["mean_confidence"] == pytest.approx((0.9 + 0.3 + 0.6 + 0.4) / 4, rel=1e-6)
    assert color["low_confidence_share"] == pytest.approx(0.5)  # 0.3 and 0.4 < 0.5
    assert badges["kind"] == "multilabel" and badges["rows"] == 4
    assert badges["labels"] == {"sale": 1, "logo": 2, NO_LABEL: 2}
    assert badges["mean_confidence"] == pytest.approx((0.8 + 0.2 + 0.9 + 0.45) / 4, rel=1e-6)  # max label score
    assert badges["low_confidence_share"] == pytest.approx(0.5)  # 0.2 and 0.45


def test_profile_files_counts_labels_and_confidence_of_ok_rows(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    _check_profile(profile_files(output, None, _write_files(output), TASKS))
    strict = profile_files(output, None, _write_files(output), TASKS, low_confidence=0.85)
    assert strict["tasks"]["color"]["low_confidence_share"] == pytest.approx(0.75)


def test_profile_files_reads_local_paths_with_glob_characters(tmp_path: Path) -> None:
    output = str(tmp_path / "out[12]")  # DuckDB reads a path as a glob: this one would match out1, not itself
    decoy = tmp_path / "out1"
    for rel in _write_files(str(decoy)):
        one = pa.Table.from_pylist([{"uri": "z", "status": "ok", "color": "blue", "color_score": 0.9}])
        pq.write_table(one, decoy / "predictions" / rel)
    _check_profile(profile_files(output, None, _write_files(output), TASKS))


def test_profile_files_streams_files_of_an_object_store() -> None:
    output = "memory://drift-profile/out"  # not local: read through pyarrow + fsspec, not DuckDB's own reader
    _check_profile(profile_files(output, None, _write_files(output), TASKS))


def test_profile_of_no_files_is_empty_and_gives_no_verdict() -> None:
    prof = profile_files("/nowhere", None, [], TASKS)
    assert prof["tasks"]["color"] == {
        "kind": "multiclass",
        "rows": 0,
        "labels": {},
        "mean_confidence": None,
        "low_confidence_share": None,
    }
    assert detect(prof, [prof], DriftConfig()) == []


# --------------------------------------------------------------------------------------------- real runs
def _tint_red(folder: str) -> None:
    """Every image of the folder strongly tinted red, in its own format."""
    from PIL import Image

    for path in Path(folder).iterdir():
        with Image.open(path) as im:
            fmt, rgb = im.format, im.convert("RGB")
        Image.blend(rgb, Image.new("RGB", rgb.size, (255, 0, 0)), 0.6).save(path, format=fmt)


def _tag_and_profile(model: str, source: str, output: str) -> dict[str, Any]:
    """Tag ``source`` into a fresh ``output`` and profile the files its run committed."""
    from catalog_tagger.model.artifact import load_card
    from catalog_tagger.tag import delta, job
    from catalog_tagger.tag.config import TagJobConfig

    result = job.run(TagJobConfig(model=model, source=source, output=output, executor="local", calibrate=False))
    assert result.manifest is not None and result.ok > 0
    table = delta.open_table(delta.table_uri(output, delta.PREDICTIONS), None)
    assert table is not None
    return profile_files(output, None, delta.data_files(table), load_card(model).task_config())


@pytest.mark.slow
def test_drift_fires_when_the_catalog_colours_change_and_not_on_a_repeat(catalog_kit, tmp_path: Path) -> None:
    from catalog_tagger.train.config import TrainConfig
    from catalog_tagger.train.pipeline import train

    kit = catalog_kit(images=200, seed=0, min_size=96, max_size=128, name="drift")
    other = catalog_kit(images=200, seed=1, min_size=96, max_size=128, name="drift-other")  # same colour mix
    model = str(tmp_path / "model")  # a few epochs: the colour head must follow the pixels, as a real one does
    train(TrainConfig(tasks=kit["tasks"], labels=kit["labels"], out=model, backbone="tiny_cnn", image_size=32,
                      epochs=6, val_fraction=0.1, test_fraction=0.1, threads=2, progress=False))  # fmt: skip
    tinted = str(tmp_path / "tinted")
    shutil.copytree(other["source"], tinted)
    _tint_red(tinted)

    first = _tag_and_profile(model, kit["source"], str(tmp_path / "out-first"))
    repeat = _tag_and_profile(model, kit["source"], str(tmp_path / "out-repeat"))
    fresh = _tag_and_profile(model, other["source"], str(tmp_path / "out-fresh"))
    red = _tag_and_profile(model, tinted, str(tmp_path / "out-tinted"))

    before = first["tasks"]["color"]["labels"]
    assert first["tasks"]["color"]["rows"] == 200 and len(before) >= 3
    assert max(before, key=before.__getitem__) != "red"
    assert detect(repeat, [first], DriftConfig()) == []
    assert detect(fresh, [first], DriftConfig()) == []  # other images, same distribution: sampling noise only
    warnings = {w["task"]: w for w in detect(red, [first, fresh], DriftConfig())}
    assert "color" in warnings and warnings["color"]["psi"] >= 0.2
    labels = red["tasks"]["color"]["labels"]
    assert max(labels, key=labels.__getitem__) == "red"  # the shift is the one made: towards red
