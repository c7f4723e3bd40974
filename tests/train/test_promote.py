"""The promotion gate: per-task verdicts in each metric's direction, label/range remapping, and real trainings that
promote (first model, a better one) or refuse (a worse one), leaving the current location as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catalog_tagger.config import TaskSpec
from catalog_tagger.errors import ConfigError, UserError
from catalog_tagger.model.artifact import load_card
from catalog_tagger.train.promote import (
    BETTER,
    EXIT_NOT_PROMOTED,
    MISSING,
    NEW_TASK,
    NOT_COMPARABLE,
    PROMOTION_FILE,
    WITHIN,
    WORSE,
    judge,
    remap,
    resize_images,
)

COLOR = TaskSpec(name="color", kind="multiclass", labels=("red", "green", "blue"))
BADGES = TaskSpec(name="badges", kind="multilabel", labels=("sale", "logo"))
SIZE = TaskSpec(name="item_size", kind="regression", range=(0.0, 10.0))


def _verdicts(new: dict, current: dict, tol: float, tasks=(COLOR, SIZE), new_tasks=None) -> dict[str, str]:
    out = judge(list(new_tasks or tasks), new, list(tasks), current, tol)
    return {t.task: t.verdict for t in out}


@pytest.mark.parametrize(
    ("cur", "new", "verdict"),
    [(0.80, 0.85, BETTER), (0.80, 0.80, BETTER), (0.80, 0.795, WITHIN), (0.80, 0.79, WITHIN), (0.80, 0.70, WORSE)],
)
def test_accuracy_higher_is_better(cur: float, new: float, verdict: str) -> None:
    got = _verdicts({"color": {"accuracy": new}}, {"color": {"accuracy": cur}}, 0.01, tasks=(COLOR,))
    assert got == {"color": verdict}


@pytest.mark.parametrize(
    ("cur", "new", "verdict"), [(1.0, 0.5, BETTER), (1.0, 1.005, WITHIN), (1.0, 1.5, WORSE), (1.0, 0.99, BETTER)]
)
def test_an_error_metric_is_lower_is_better(cur: float, new: float, verdict: str) -> None:
    """Regression's headline is MAE: a higher value is the worse model (the kind's ``higher_is_better``)."""
    got = _verdicts({"item_size": {"mae": new}}, {"item_size": {"mae": cur}}, 0.01, tasks=(SIZE,))
    assert got == {"item_size": verdict}


def test_shared_tasks_count_a_missing_one_refuses_a_new_one_does_not() -> None:
    current = {"color": {"accuracy": 0.5}, "item_size": {"mae": 1.0}}
    new = {"color": {"accuracy": 0.9}, "badges": {"micro_f1": 0.1}}
    out = judge([COLOR, BADGES], new, [COLOR, SIZE], current, 0.01)
    by = {t.task: t for t in out}
    assert {k: t.verdict for k, t in by.items()} == {"color": BETTER, "item_size": MISSING, "badges": NEW_TASK}
    assert by["item_size"].refuses and not by["badges"].refuses and not by["color"].refuses
    assert by["color"].change == pytest.approx(0.4)
    changed = TaskSpec(name="color", kind="multilabel", labels=("red", "green", "blue"))
    [t] = judge([changed], {"color": {"micro_f1": 1.0}}, [COLOR], {"color": {"accuracy": 0.1}}, 0.01)
    assert t.verdict == NOT_COMPARABLE and "multiclass to multilabel" in t.note and t.refuses


def test_a_metric_nobody_could_measure_does_not_refuse() -> None:
    assert _verdicts({"color": {"accuracy": None}}, {"color": {"accuracy": None}}, 0.0, tasks=(COLOR,)) == {
        "color": BETTER
    }


def test_remap_labels_by_name_and_regression_ranges() -> None:
    new = TaskSpec(name="color", kind="multiclass", labels=("blue", "red", "yellow"))
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)  # red, green, blue
    mapped, th = remap(COLOR, new, scores, [0.3, 0.4, 0.5])
    np.testing.assert_allclose(mapped, [[0.1, 0.7, 0.0], [0.8, 0.1, 0.0]])
    assert th == [0.5, 0.3, 1.0]  # a label the current model does not know is never predicted
    wider = TaskSpec(name="item_size", kind="regression", range=(0.0, 20.0))
    mapped, _ = remap(SIZE, wider, np.array([[0.5], [1.0]], np.float32), None)  # 5 and 10 in SIZE's units
    np.testing.assert_allclose(mapped, [[0.25], [0.5]])
    same, _ = remap(COLOR, COLOR, scores, None)
    assert same is scores


def test_resize_images_keeps_a_flat_colour() -> None:
    img = np.full((2, 32, 32, 3), (200, 10, 90), np.uint8)
    out = resize_images(img, 48)
    assert out.shape == (2, 48, 48, 3) and out.dtype == np.uint8
    assert (out == np.array((200, 10, 90), np.uint8)).all()


def test_promote_to_cannot_be_the_out_folder(tiny_cfg, tmp_path) -> None:
    with pytest.raises(ConfigError, match="promote_to"):
        tiny_cfg(tmp_path / "m", promote_to=str(tmp_path / "m") + "/")


# --------------------------------------------------------------------------------------------- real trainings
BAD = {"epochs": 1, "lr": 1e-6}  # barely moves from the random init: clearly worse than GOOD on every seed
GOOD = {"epochs": 6, "patience": 10}


@pytest.fixture(scope="module")
def current(tiny_cfg, tmp_path_factory) -> dict:
    """A good model trained once, promoted as the first model to a fresh ``current`` folder."""
    from catalog_tagger.train.pipeline import train

    root = tmp_path_factory.mktemp("promote")
    cur = root / "current"
    res = train(tiny_cfg(root / "good", promote_to=str(cur), **GOOD))
    return {"root": root, "current": cur, "res": res}


@pytest.mark.slow
def test_first_model_is_promoted(current) -> None:
    res, cur = current["res"], current["current"]
    assert res.promotion is not None and res.promotion["promoted"] is True
    assert res.promotion["current_version"] is None and res.promotion["tasks"] == []
    assert load_card(cur).version == res.card.version
    assert (cur / "model.safetensors").read_bytes() == (Path(res.out) / "model.safetensors").read_bytes()
    record = json.loads((cur / PROMOTION_FILE).read_text())
    assert (record["from_version"], record["to_version"]) == (None, res.card.version)
    report = json.loads((Path(res.out) / "training_report.json").read_text())
    assert report["promotion"]["promoted"] is True


@pytest.mark.slow
def test_worse_model_is_refused_and_current_is_unchanged(current, tiny_cfg) -> None:
    from catalog_tagger.train.pipeline import train

    cur = current["current"]
    before = (cur / "model.safetensors").read_bytes(), (cur / "model.json").read_bytes()
    res = train(tiny_cfg(current["root"] / "bad", promote_to=str(cur), promotion_tolerance=0.0, **BAD))
    p = res.promotion
    assert p is not None and p["promoted"] is False
    assert p["current_version"] == current["res"].card.version and p["new_version"] == res.card.version
    worse = [t for t in p["tasks"] if t["verdict"] == WORSE]
    assert worse and all(t["task"] in p["message"] for t in worse)
    assert {t["task"] for t in p["tasks"]} == {"garment", "color", "pattern", "badges"}
    # the same test images on both sides: the current model's metric here is its own card's test metric
    good_metrics = current["res"].card.metrics
    for t in p["tasks"]:
        assert t["current"] == pytest.approx(good_metrics[t["task"]][t["metric"]])
        assert t["new"] == pytest.approx(res.card.metrics[t["task"]][t["metric"]])
    assert ((cur / "model.safetensors").read_bytes(), (cur / "model.json").read_bytes()) == before
    assert json.loads((cur / PROMOTION_FILE).read_text())["to_version"] == current["res"].card.version


@pytest.mark.slow
def test_better_model_is_promoted_over_a_worse_current(tiny_cfg, tmp_path) -> None:
    """A bad current model at another input size (its test images are resized for it), then a better one."""
    from catalog_tagger.train.pipeline import train

    cur = tmp_path / "current"
    bad = train(tiny_cfg(tmp_path / "bad", promote_to=str(cur), image_size=40, **BAD))
    assert bad.promotion is not None and bad.promotion["promoted"] and load_card(cur).image_size == 40
    good = train(tiny_cfg(tmp_path / "good", promote_to=str(cur), **GOOD))
    p = good.promotion
    assert p is not None and p["promoted"] is True, p["message"]
    assert any(t["verdict"] == BETTER and t["change"] > 0 for t in p["tasks"])
    assert load_card(cur).version == good.card.version != bad.card.version
    record = json.loads((cur / PROMOTION_FILE).read_text())
    assert (record["from_version"], record["to_version"]) == (bad.card.version, good.card.version)


def test_a_current_model_that_does_not_load_stops_before_training(tiny_cfg, tmp_path) -> None:
    from catalog_tagger.train.pipeline import train

    cur = tmp_path / "current"
    cur.mkdir()
    (cur / "model.json").write_text("{not json")
    with pytest.raises(UserError, match=r"current model .* does not load"):
        train(tiny_cfg(tmp_path / "m", promote_to=str(cur)))
    assert not (tmp_path / "m" / "model.json").exists()  # refused before any training


@pytest.mark.slow
def test_cli_exits_3_when_not_promoted(current, catalog) -> None:
    cur = current["current"]
    version = load_card(cur).version
    cmd = [
        sys.executable, "-m", "catalog_tagger.cli", "train", "--tasks", catalog.tasks_uri, "--labels",
        catalog.labels_uri, "--out", str(current["root"] / "cli-bad"), "--backbone", "tiny_cnn", "--image-size", "32",
        "--batch-size", "16", "--epochs", "1", "--lr", "1e-6", "--promote-to", str(cur), "--promotion-tolerance", "0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_NOT_PROMOTED, proc.stderr[-2000:]
    assert "not promoted" in proc.stderr and "promotion gate" in proc.stdout
    assert load_card(cur).version == version


def test_a_gate_without_a_test_split_is_refused_before_training(tiny_cfg, tmp_path) -> None:
    from catalog_tagger.train.pipeline import train

    with pytest.raises(UserError, match="test_fraction > 0"):
        train(tiny_cfg(tmp_path / "m", promote_to=str(tmp_path / "current"), test_fraction=0))
    assert not (tmp_path / "m").exists()
