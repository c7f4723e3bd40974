"""``--single-task``: one artifact per task, comparison.json with measured speed, at equal epochs and equal compute."""

from __future__ import annotations

import json

import numpy as np
import pytest

from catalog_tagger.model.artifact import load_artifact
from catalog_tagger.train.compare import EQUAL_COMPUTE_DIR, equal_compute_epochs, iter_comparison_rows, steps_per_epoch
from catalog_tagger.train.pipeline import train


def test_single_task_writes_comparison(tiny_cfg, tmp_path):
    res = train(tiny_cfg(tmp_path / "m", epochs=1, single_task=True, timing_repeats=3))
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
    # 1 joint epoch over 4 tasks: the equal-compute budget rounds up to 1 epoch, the same training, not run twice
    assert comp["budgets"]["equal_compute"]["epochs_per_model"] == 1
    assert not (tmp_path / "m" / EQUAL_COMPUTE_DIR).exists()


def test_equal_compute_singles_share_the_joint_budget(tiny_cfg, tmp_path):
    """4 joint epochs, 4 tasks: at equal epochs each single model trains 4 epochs (4x the joint steps in all), at
    equal compute 1 epoch each (1x); both comparisons are in comparison.json and in the table rows."""
    res = train(tiny_cfg(tmp_path / "m", epochs=4, patience=10, single_task=True, timing_repeats=1))
    comp = json.loads((tmp_path / "m" / "comparison.json").read_text())
    b = comp["budgets"]
    n_train = res.card.training["split"]["counts"]["train"]
    spe = steps_per_epoch(n_train, 16)
    assert b["joint"] == {"epochs": 4, "steps": 4 * spe, "seconds": b["joint"]["seconds"]} and b["joint"]["seconds"] > 0
    assert (b["equal_epochs"]["epochs_per_model"], b["equal_epochs"]["steps"]) == (4, 4 * 4 * spe)
    assert (b["equal_compute"]["epochs_per_model"], b["equal_compute"]["steps"]) == (1, 4 * spe)
    assert (b["equal_epochs"]["steps_ratio"], b["equal_compute"]["steps_ratio"]) == (4.0, 1.0)
    # measured training seconds: a quarter of the epochs takes clearly less time than the full budget
    assert 0 < b["equal_compute"]["seconds"] < b["equal_epochs"]["seconds"]
    for name, t in comp["tasks"].items():
        assert (t["single_task_epochs"], t["single_task_steps"]) == (4, 4 * spe)
        ec = t["equal_compute"]
        assert (ec["epochs"], ec["steps"]) == (1, spe) and ec["train_seconds"] > 0
        assert ec["metric"] is not None and ec["metric"] == ec["metrics"][t["metric"]]
        _, card = load_artifact(tmp_path / "m" / EQUAL_COMPUTE_DIR / name)
        assert card.training["epochs"]["run"] == 1
    rows = list(iter_comparison_rows(comp))
    assert len(rows) == 4 and all("equal compute" in r[3] for r in rows)


@pytest.mark.parametrize(("joint", "n", "each"), [(15, 4, 4), (4, 4, 1), (1, 4, 1), (8, 3, 3), (6, 1, 6)])
def test_equal_compute_epochs_round_up(joint: int, n: int, each: int) -> None:
    assert equal_compute_epochs(joint, n) == each


@pytest.mark.parametrize(("images", "batch", "steps"), [(48, 16, 3), (49, 16, 3), (50, 16, 4), (1, 16, 1), (0, 16, 0)])
def test_steps_per_epoch_folds_a_trailing_single_image(images: int, batch: int, steps: int) -> None:
    assert steps_per_epoch(images, batch) == steps


def test_steps_per_epoch_is_the_loops_own_batching(tiny_cfg, tmp_path) -> None:
    """The recorded steps are what ``loop.fit`` runs: its own batching of the same number of images."""
    import torch

    from catalog_tagger.config import load_tasks
    from catalog_tagger.train.loop import Dist, _Fit, new_model
    from catalog_tagger.train.pipeline import resolve

    cfg = resolve(tiny_cfg(tmp_path / "m", batch_size=16))
    model = new_model(cfg, load_tasks(cfg.tasks), torch.device("cpu"))
    run = _Fit(model, model, cfg, torch.device("cpu"), Dist(), "t")
    for n in (0, 1, 15, 16, 17, 33, 48, 49, 50):
        assert len(run.batches(np.arange(n), 1)) == steps_per_epoch(n, 16), n
