"""``--single-task``: one artifact per task and comparison.json with measured speed."""

from __future__ import annotations

import json

from catalog_tagger.model.artifact import load_artifact
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
