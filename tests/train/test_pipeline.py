"""``train(cfg)`` end to end: the artifact and its side files, refusals before work, skipped images, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from catalog_tagger.errors import UserError
from catalog_tagger.model.artifact import load_artifact
from catalog_tagger.train.pipeline import train


@pytest.fixture(scope="module")
def trained(tiny_cfg, tmp_path_factory):
    return train(tiny_cfg(tmp_path_factory.mktemp("model")))


# --------------------------------------------------------------------------------------------- end to end
def test_artifact_loads_and_predicts(trained, catalog):
    from catalog_tagger.model.inference import predict_uris

    _, card = load_artifact(trained.out)
    assert card.backbone == "tiny_cnn" and card.image_size == 32
    assert set(card.metrics) == {"garment", "color", "pattern", "badges"}
    assert {"accuracy", "macro_f1"} <= set(card.metrics["garment"])
    assert {"micro_f1", "macro_f1", "map"} <= set(card.metrics["badges"])
    badges = next(t for t in card.tasks if t["name"] == "badges")
    assert len(badges["label_thresholds"]) == 3
    assert all(0 < x < 1 for x in badges["label_thresholds"])
    training = card.training
    assert sum(training["split"]["counts"].values()) == 80
    assert training["skipped_images"] == 0
    assert training["split"]["file"] == "split.parquet"
    results = predict_uris(trained.out, catalog.images[:3])
    assert [r["status"] for r in results] == ["ok"] * 3
    assert set(results[0]["predictions"]) == {"garment", "color", "pattern", "badges"}


def test_metrics_csv_one_row_per_epoch_with_task_columns(trained):
    df = pd.read_csv(os.path.join(trained.out, "metrics.csv"))
    assert len(df) == trained.epochs_run == 2
    assert list(df["epoch"]) == [1, 2]
    for col in ("lr", "seconds", "train_loss", "val_loss"):
        assert col in df.columns
    for col in (
        "val_garment_accuracy",
        "val_garment_macro_f1",
        "val_color_accuracy",
        "val_pattern_accuracy",
        "val_badges_micro_f1",
        "val_badges_macro_f1",
        "val_badges_map",
    ):
        assert col in df.columns, col
        assert df[col].notna().all()


def test_split_file_and_report(trained, catalog):
    split = pq.read_table(os.path.join(trained.out, "split.parquet")).to_pandas()
    assert sorted(split["uri"]) == sorted(catalog.images)
    assert set(split["split"]) == {"train", "val", "test"}
    with open(os.path.join(trained.out, "training_report.json")) as fh:
        report = json.load(fh)
    assert report["images"] == {"rows": 80, "used": 80, "skipped": 0}
    assert report["split"] == trained.card.training["split"]["counts"]


# --------------------------------------------------------------------------------------------- refusals
def test_colour_jitter_is_refused_for_a_colour_task(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match=r"colour jitter.*color"):
        train(tiny_cfg(tmp_path / "m", color_jitter=0.2))


def test_bad_config_values_are_user_errors(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match="val_fraction"):
        tiny_cfg(tmp_path, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match="crop_scale"):
        tiny_cfg(tmp_path, crop_scale=(0.9, 0.5))
    with pytest.raises(UserError, match="unknown backbone"):
        train(tiny_cfg(tmp_path / "m", backbone="nope"))


def test_unreadable_images_are_skipped_and_reported(catalog, tiny_cfg, tmp_path, write_labels):
    rows = pq.read_table(catalog.labels_uri).to_pylist()[:40]
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    rows.append({"uri": str(tmp_path / "random.jpg"), "garment": "dress", "color": "red", "pattern": "plain"})
    rows.append({"uri": "missing_file.jpg", "garment": "bag", "color": "red", "pattern": "plain", "badges": []})
    labels = write_labels(tmp_path / "labels.parquet", rows)
    res = train(tiny_cfg(tmp_path / "m", labels=labels, epochs=1))
    assert res.images_used == 40
    assert len(res.skipped) == 2
    report = json.loads((tmp_path / "m" / "training_report.json").read_text())
    assert report["images"] == {"rows": 42, "used": 40, "skipped": 2}
    reasons = {os.path.basename(s["uri"]): s["error"] for s in report["skipped"]}
    assert reasons["random.jpg"].startswith("undecodable")
    assert reasons["missing_file.jpg"].startswith("unreadable")
    assert res.card.training["skipped_images"] == 2
    split = pq.read_table(str(tmp_path / "m" / "split.parquet")).to_pandas()
    assert len(split) == 40


# --------------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_exits_2_on_a_bad_labels_table(catalog, tmp_path, write_labels):
    labels = write_labels(tmp_path / "bad.parquet", [{"uri": "a.jpg", "garment": "hat", "color": "red"}])
    proc = _cli("train", "--tasks", catalog.tasks_uri, "--labels", labels, "--out", str(tmp_path / "m"))
    assert proc.returncode == 2, proc.stderr
    assert "pattern" in proc.stderr  # the missing task columns are named
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_cli_trains_a_tiny_model(catalog, tmp_path):
    proc = _cli(
        "train", "--tasks", catalog.tasks_uri, "--labels", catalog.labels_uri, "--out", str(tmp_path / "m"),
        "--backbone", "tiny_cnn", "--image-size", "32", "--epochs", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "garment" in proc.stdout
    load_artifact(tmp_path / "m")
