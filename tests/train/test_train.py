"""Training: labels validation, decode-once cache, split, masked loss, metrics, thresholds, artifact, CLI, Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from catalog_tagger.config import parse_tasks
from catalog_tagger.errors import UserError
from catalog_tagger.model.artifact import load_artifact
from catalog_tagger.model.multihead import build_model
from catalog_tagger.train.loop import Augment, TrainConfig, combine_losses, load_labels, make_split, task_losses, train
from catalog_tagger.metrics import (
    average_precision,
    confusion_matrix,
    multiclass_metrics,
    multilabel_metrics,
    tune_thresholds,
)

TASKS = parse_tasks(
    {
        "tasks": [
            {"name": "shape", "kind": "multiclass", "labels": ["square", "circle", "star"]},
            {"name": "color", "kind": "multiclass", "labels": ["red", "green"]},
            {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo", "text"]},
        ]
    }
)


def tiny_cfg(catalog, out, **kw) -> TrainConfig:
    base = dict(
        tasks=catalog.tasks_uri,
        labels=catalog.labels_uri,
        out=str(out),
        backbone="tiny_cnn",
        image_size=32,
        epochs=2,
        batch_size=16,
        progress=False,
    )
    base.update(kw)
    return TrainConfig.parse(**base)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from catalog_tagger.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("catalog")
    return generate(SynthConfig(out=str(out), images=80, seed=3, min_size=300, max_size=400))


@pytest.fixture(scope="module")
def trained(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    return train(tiny_cfg(catalog, out))


def write_labels(path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


# --------------------------------------------------------------------------------------------- end to end
def test_artifact_loads_and_predicts(trained, catalog):
    from catalog_tagger.model.inference import predict_uris

    model, card = load_artifact(trained.out)
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


# --------------------------------------------------------------------------------------------- masking
def test_masked_task_gets_exactly_zero_gradient():
    torch.manual_seed(0)
    model = build_model(backbone="tiny_cnn", tasks=TASKS)
    x = torch.randint(0, 255, (6, 32, 32, 3), dtype=torch.uint8)
    targets = {
        "shape": torch.tensor([0, 1, 2, 0, 1, 2]),
        "color": torch.full((6,), -1, dtype=torch.int64),  # every colour label missing
        "badges": torch.tensor([[1, 0, 0], [0, 1, 1], [-1, -1, -1], [0, 0, 0], [1, 1, 1], [-1, -1, -1]]).float(),
    }
    out = model(model.prepare(x))
    loss = combine_losses(task_losses(out.logits, targets, TASKS.tasks), TASKS.tasks)
    loss.backward()
    for p in model.heads["color"].parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    for name in ("shape", "badges"):
        assert torch.count_nonzero(model.heads[name].weight.grad) > 0


def test_missing_rows_do_not_change_the_loss():
    torch.manual_seed(0)
    logits = {"shape": torch.randn(4, 3), "color": torch.randn(4, 2), "badges": torch.randn(4, 3)}
    full = {
        "shape": torch.tensor([0, 1, 2, 0]),
        "color": torch.tensor([1, 0, 1, 0]),
        "badges": torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]]).float(),
    }
    masked = {k: v.clone() for k, v in full.items()}
    masked["shape"][3] = -1
    masked["badges"][2] = -1
    parts = task_losses(logits, masked, TASKS.tasks)
    ref = torch.nn.functional.cross_entropy(logits["shape"][:3], full["shape"][:3])
    s, c = parts["shape"]
    assert c == 3 and torch.isclose(s / c, ref)
    keep = torch.tensor([0, 1, 3])
    ref_b = torch.nn.functional.binary_cross_entropy_with_logits(logits["badges"][keep], full["badges"][keep]) * 3
    s, c = parts["badges"]
    assert c == 3 and torch.isclose(s / c, ref_b)


# --------------------------------------------------------------------------------------------- validation
def _tasks_file(tmp_path) -> str:
    path = tmp_path / "tasks.yaml"
    path.write_text(TASKS.to_yaml())
    return str(path)


def test_unknown_label_is_a_user_error_naming_it(tmp_path):
    rows = [
        {"uri": "a.jpg", "shape": "square", "color": "red", "badges": ["sale"]},
        {"uri": "b.jpg", "shape": "hexagon", "color": "red", "badges": ["sale"]},
        {"uri": "c.jpg", "shape": "hexagon", "color": "teal", "badges": ["gift"]},
    ]
    labels = write_labels(tmp_path / "labels.parquet", rows)
    with pytest.raises(UserError) as exc:
        load_labels(labels, TASKS)
    msg = str(exc.value)
    assert "shape='hexagon' (2 rows)" in msg
    assert "color='teal' (1 row)" in msg
    assert "badges='gift'" in msg


def test_missing_uri_column_is_a_user_error(tmp_path):
    labels = write_labels(tmp_path / "labels.parquet", [{"path": "a.jpg", "shape": "square", "color": "red"}])
    with pytest.raises(UserError, match="no 'uri' column"):
        load_labels(labels, TASKS)


def test_missing_task_column_is_a_user_error(tmp_path):
    labels = write_labels(tmp_path / "labels.parquet", [{"uri": "a.jpg", "shape": "square", "color": "red"}])
    with pytest.raises(UserError, match="no column for task.*'badges'"):
        load_labels(labels, TASKS)


def test_csv_table_relative_uris_pipe_multilabel_and_missing(tmp_path):
    (tmp_path / "t.csv").write_text(
        "uri,shape,color,badges\nimg/a.jpg,square,red,sale|logo\n/abs/b.jpg,,green,[]\ns3://bkt/c.jpg,star,,\n"
    )
    table = load_labels(str(tmp_path / "t.csv"), TASKS)
    assert table.uris == [str(tmp_path / "img" / "a.jpg"), "/abs/b.jpg", "s3://bkt/c.jpg"]
    assert table.targets["shape"].tolist() == [0, -1, 2]
    assert table.targets["color"].tolist() == [0, 1, -1]
    assert table.targets["badges"].tolist() == [[1, 1, 0], [0, 0, 0], [-1, -1, -1]]


def test_colour_jitter_is_refused_for_a_colour_task(catalog, tmp_path):
    with pytest.raises(UserError, match="colour jitter.*color"):
        train(tiny_cfg(catalog, tmp_path / "m", color_jitter=0.2))


def test_bad_config_values_are_user_errors(catalog, tmp_path):
    with pytest.raises(UserError, match="val_fraction"):
        tiny_cfg(catalog, tmp_path, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match="crop_scale"):
        tiny_cfg(catalog, tmp_path, crop_scale=(0.9, 0.5))
    with pytest.raises(UserError, match="unknown backbone"):
        train(tiny_cfg(catalog, tmp_path / "m", backbone="nope"))


def test_unreadable_images_are_skipped_and_reported(catalog, tmp_path):
    rows = pq.read_table(catalog.labels_uri).to_pylist()[:40]
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    rows.append({"uri": str(tmp_path / "random.jpg"), "garment": "dress", "color": "red", "pattern": "plain"})
    rows.append({"uri": "missing_file.jpg", "garment": "bag", "color": "red", "pattern": "plain", "badges": []})
    labels = write_labels(tmp_path / "labels.parquet", rows)
    res = train(tiny_cfg(catalog, tmp_path / "m", labels=labels, epochs=1))
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


# --------------------------------------------------------------------------------------------- split
def test_split_fractions_stratified_and_seeded():
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=2000, p=[0.6, 0.3, 0.1])
    y[rng.random(2000) < 0.1] = -1  # missing labels form their own stratum
    targets = {"shape": y, "color": np.zeros(2000, np.int64), "badges": np.zeros((2000, 3), np.float32)}
    split = make_split(TASKS, targets, val=0.15, test=0.15, seed=7)
    counts = split.counts()
    assert sum(counts.values()) == 2000
    assert abs(counts["val"] - 300) <= 4 and abs(counts["test"] - 300) <= 4
    assert split.stratify == "shape"
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert np.array_equal(np.sort(all_idx), np.arange(2000))
    for cls in (-1, 0, 1, 2):
        overall = np.mean(y == cls)
        for part in (split.train, split.val, split.test):
            assert abs(np.mean(y[part] == cls) - overall) < 0.015
    again = make_split(TASKS, targets, val=0.15, test=0.15, seed=7)
    assert np.array_equal(again.test, split.test)
    other = make_split(TASKS, targets, val=0.15, test=0.15, seed=8)
    assert not np.array_equal(other.test, split.test)


# --------------------------------------------------------------------------------------------- metrics
def test_multiclass_metrics_hand_computed():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = multiclass_metrics(y_true, y_pred, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: c0 tp1 fp1 fn1 -> 0.5; c1 tp2 fp1 fn0 -> 0.8; c2 tp1 fp0 fn1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # A class absent from truth and prediction does not drag the macro average down.
    assert multiclass_metrics(y_true, y_pred, 5)["macro_f1"] == pytest.approx(m["macro_f1"])


def test_multilabel_metrics_hand_computed():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    s = np.array([[0.9, 0.2], [0.4, 0.8], [0.6, 0.3], [0.1, 0.7]])
    m = multilabel_metrics(y, s, [0.5, 0.5], labels=["a", "b"])
    # label a: pred [1,0,1,0] -> tp1 fp1 fn1 (F1 .5); label b: pred [0,1,0,1] -> tp1 fp1 fn1 (F1 .5)
    assert m["micro_f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.5)
    # AP a: ranking .9(+) .6(-) .4(+) .1(-) -> 1*0.5 + (2/3)*0.5; AP b: .8(+) .7(-) .3(+) .2(-) -> same
    assert m["map"] == pytest.approx(0.5 + 1 / 3)
    assert m["per_label"]["a"]["support"] == 2
    assert average_precision(np.array([0, 0]), np.array([0.1, 0.2])) is None
    # Tied scores enter together: one threshold holding 1 positive and 1 negative -> precision 0.5 at recall 1.
    assert average_precision(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_threshold_tuning_beats_half():
    # Positives score 0.3-0.45 (a timid head), negatives 0.05-0.2: at 0.5 nothing is predicted, F1 = 0.
    y = np.array([[1], [1], [1], [0], [0], [0], [0]], dtype=bool)
    s = np.array([[0.45], [0.35], [0.3], [0.2], [0.1], [0.05], [0.15]])
    (thr,) = tune_thresholds(y, s)
    assert 0.2 < thr <= 0.3
    assert multilabel_metrics(y, s, [thr])["micro_f1"] == 1.0
    assert multilabel_metrics(y, s, [0.5])["micro_f1"] == 0.0
    # No positives to tune on: keep the default.
    assert tune_thresholds(np.zeros((3, 1), bool), np.array([[0.9], [0.1], [0.4]])) == [0.5]


# --------------------------------------------------------------------------------------------- augmentation
def test_augment_flip_is_exact_and_crop_keeps_shape():
    x = torch.rand(4, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    flipped = Augment(crop_scale=(1.0, 1.0), hflip=True)(x, gen)
    for i in range(4):
        assert torch.allclose(flipped[i], x[i], atol=1e-5) or torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5)
    cropped = Augment(crop_scale=(0.6, 1.0), hflip=False, color_jitter=0.2)(x, gen)
    assert cropped.shape == x.shape and float(cropped.min()) >= 0 and float(cropped.max()) <= 1


# --------------------------------------------------------------------------------------------- single-task
def test_single_task_writes_comparison(catalog, tmp_path):
    res = train(tiny_cfg(catalog, tmp_path / "m", epochs=1, single_task=True, timing_repeats=3))
    comp = json.loads((tmp_path / "m" / "comparison.json").read_text())
    assert comp == res.comparison
    assert comp["n_tasks"] == 4
    assert set(comp["tasks"]) == {"garment", "color", "pattern", "badges"}
    for entry in comp["tasks"].values():
        assert entry["metric"] in ("accuracy", "micro_f1")
        assert entry["single_task_ms_per_image"] > 0
        assert entry["multi_head"] is not None and entry["single_task"] is not None
    assert comp["cost_ratio"] > 0
    assert comp["single_task_total"]["parameters"] > comp["multi_head"]["parameters"]
    for task in comp["tasks"]:
        _, card = load_artifact(tmp_path / "m" / "single_task" / task)
        assert [t["name"] for t in card.tasks] == [task]


# --------------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_exits_2_on_a_bad_labels_table(catalog, tmp_path):
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


# --------------------------------------------------------------------------------------------- Ray Train
@pytest.mark.slow
def test_ray_train_two_workers_yields_a_loadable_artifact(catalog, tmp_path, ray_local):
    res = train(tiny_cfg(catalog, tmp_path / "m", workers=2, epochs=2))
    model, card = load_artifact(tmp_path / "m")
    assert card.training["workers"] == 2
    assert res.epochs_run == 2 and len(res.history) == 2
    df = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert len(df) == 2 and "val_garment_accuracy" in df.columns
    x = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(model.prepare(x))
    assert out.logits["garment"].shape == (2, 5)
