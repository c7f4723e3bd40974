"""Training on input that cannot train (issue 13, cases 14 and 17): a loss that goes non-finite stops the run
with one line instead of saving the random initialisation; the label counts and the "no labels" spelling are
said at the start of training."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalog_tagger.errors import TrainingDiverged
from catalog_tagger.train.labels import load_labels, log_label_counts
from catalog_tagger.train.pipeline import train, validate


def _overflowing_tasks(catalog, tmp_path) -> str:
    """The catalog's tasks with one finite weight that overflows float32 (1e39 > 3.4e38): the loss is inf."""
    data = yaml.safe_load(Path(catalog.tasks_uri).read_text())
    data["tasks"][-1]["weight"] = 1e39
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_non_finite_loss_stops_training_without_an_artifact(catalog, tiny_cfg, tmp_path):
    out = tmp_path / "m"
    cfg = tiny_cfg(out, tasks=_overflowing_tasks(catalog, tmp_path))
    with pytest.raises(TrainingDiverged, match=r"loss became inf at epoch 1, step 1 \(task\(s\) badges\)"):
        train(cfg)
    assert not (out / "model.json").exists() and not (out / "model.safetensors").exists()


def test_train_command_exits_2_with_one_line_when_the_loss_diverges(catalog, tmp_path):
    out = tmp_path / "m"
    r = subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", "train", "--tasks", _overflowing_tasks(catalog, tmp_path),
         "--labels", catalog.labels_uri, "--out", str(out), "--backbone", "tiny_cnn", "--image-size", "32",
         "--epochs", "2", "--max-images", "40"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train: the training loss became inf") and "no model artifact" in last
    assert not (out / "model.json").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_non_finite_loss_on_ray_train_is_the_same_one_line(catalog, tiny_cfg, tmp_path):
    """Every rank sees the same all-reduced epoch loss, so all stop together; the driver gets our error back,
    not Ray's page of worker tracebacks."""
    cfg = tiny_cfg(tmp_path / "m", tasks=_overflowing_tasks(catalog, tmp_path), workers=2, epochs=1)
    with pytest.raises(TrainingDiverged, match=r"^train\[rank \d\]: the training loss became (inf|nan) at epoch 1;"):
        train(cfg)


# --------------------------------------------------------------------------------------------- labels: case 17
TASKS = (
    "tasks:\n  - {name: color, kind: multiclass, labels: [red, green]}\n"
    "  - {name: badges, kind: multilabel, labels: [sale, logo]}\n"
)


def _csv(tmp_path, rows: list[str]) -> tuple[str, str]:
    (tmp_path / "tasks.yaml").write_text(TASKS)
    (tmp_path / "labels.csv").write_text("uri,color,badges\n" + "\n".join(rows) + "\n")
    return str(tmp_path / "tasks.yaml"), str(tmp_path / "labels.csv")


def test_empty_cell_is_missing_and_brackets_are_no_labels(tmp_path):
    """The spelling the README documents: ``a|b`` labels, ``[]`` none of them, an empty cell unknown (masked)."""
    from catalog_tagger.config import load_tasks

    tasks, labels = _csv(tmp_path, ["a.jpg,red,sale|logo", "b.jpg,green,[]", "c.jpg,,", "d.jpg,red,sale"])
    table = load_labels(labels, load_tasks(tasks))
    badges = table.targets["badges"].tolist()
    assert badges == [[1, 1], [0, 0], [-1, -1], [1, 0]]
    assert table.targets["color"].tolist() == [0, 1, -1, 0]


def test_label_counts_are_logged_per_task(tmp_path, caplog):
    from catalog_tagger.train.config import TrainConfig

    tasks, labels = _csv(tmp_path, ["a.jpg,red,sale|logo", "b.jpg,green,[]", "c.jpg,,", "d.jpg,red,"])
    with caplog.at_level(logging.INFO, logger="catalog_tagger.train.labels"):
        validate(TrainConfig.parse(tasks=tasks, labels=labels, out=str(tmp_path / "m"), backbone="tiny_cnn"))
    assert "task 'color' (multiclass): 3 row(s) labelled, 1 unlabelled (empty cell: masked)" in caplog.text
    assert "task 'badges' (multilabel): 2 row(s) labelled, 1 of them with no label ([]), 2 unlabelled" in caplog.text
    assert "has no row with no label" not in caplog.text


def test_a_multilabel_task_without_negative_rows_warns(tmp_path, caplog):
    """The case of the issue: "no labels" written as an empty cell masks those rows, and every row left has a
    label, so the model learns to put a label on every image. The warning says how to spell "no labels"."""
    from catalog_tagger.config import load_tasks

    tasks, labels = _csv(tmp_path, ["a.jpg,red,sale", "b.jpg,green,", "c.jpg,red,logo", "d.jpg,green,"])
    cfg = load_tasks(tasks)
    with caplog.at_level(logging.INFO, logger="catalog_tagger.train.labels"):
        log_label_counts(load_labels(labels, cfg), cfg, "labels.csv")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "multilabel task 'badges' has no row with no label" in warnings[0].getMessage()
    assert "write [] (an empty list)" in warnings[0].getMessage()
