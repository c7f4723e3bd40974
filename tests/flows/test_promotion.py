"""The promotion gate in the ``train-model`` flow, under Prefect's test harness: the first model is promoted, a
worse one ends the flow Failed naming the worse task(s), with the comparison published as artifacts either way, and
the ``current`` location changes only on a promotion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from catalog_tagger.errors import ConfigError
from catalog_tagger.model.artifact import load_card
from catalog_tagger.train.promote import WORSE
from flows.artifacts import artifact_key, promotion_markdown
from flows.params import TrainParams
from flows.train import train_model


def test_promote_to_params() -> None:
    base = {"tasks": "t.yaml", "labels": "l.parquet", "out": "s3://b/models/v2"}
    assert TrainParams.parse("train_model", **base).promote_to is None
    # a deployment made without CATALOG_TAGGER_MODEL stores '': no gate (the nightly schedule is paused then too)
    assert TrainParams.parse("train_model", **base, promote_to="  ").promote_to is None
    p = TrainParams.parse("train_model", **base, promote_to="s3://b/models/current", promotion_tolerance=0.02)
    cfg = p.train_config()
    assert (cfg.promote_to, cfg.promotion_tolerance) == ("s3://b/models/current", 0.02)
    assert TrainParams.parse("train_model", **base).train_config().promotion_tolerance == 0.01
    with pytest.raises(ConfigError, match=r"parameter promote_to: .*unresolved template"):
        TrainParams.parse("train_model", **base, promote_to="{{ settings.model }}")
    with pytest.raises(ConfigError, match="parameter promotion_tolerance"):
        TrainParams.parse("train_model", **base, promotion_tolerance=-0.1)
    with pytest.raises(ConfigError, match=r"promote_to: .* own out folder"):
        TrainParams.parse("train_model", **base, promote_to="s3://b/models/v2/").train_config()


def test_promotion_markdown_lists_every_task() -> None:
    promotion = {
        "promoted": False,
        "message": "not promoted: task color accuracy 0.500 vs 0.900",
        "promote_to": "s3://b/current",
        "tolerance": 0.01,
        "new_version": "new1",
        "current_version": "cur1",
        "test_images": 12,
        "tasks": [
            {"task": "color", "metric": "accuracy", "current": 0.9, "new": 0.5, "change": -0.4, "verdict": WORSE,
             "note": ""},
        ],
    }  # fmt: skip
    md = promotion_markdown(promotion)
    assert md.startswith("# Not promoted: `new1` -> `s3://b/current`")
    assert "| color | accuracy | 0.900 | 0.500 | -0.400 | worse |" in md and "tolerance 0.01" in md


def _train(kit: dict[str, Any], out: Path, current: Path, **kw: Any) -> Any:
    return train_model(
        tasks=kit["tasks"], labels=kit["labels"], out=str(out), backbone="tiny_cnn", image_size=32, batch_size=16,
        promote_to=str(current), return_state=True, **kw,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness")
def test_flow_promotes_the_first_model_then_refuses_a_worse_one(catalog_kit, tmp_path) -> None:
    from prefect.artifacts import Artifact

    kit = catalog_kit(images=80, seed=3, name="promotion")
    current = tmp_path / "current"
    key = artifact_key("train", "promotion", str(current))

    first = _train(kit, tmp_path / "good", current, epochs=6, patience=10)
    assert first.is_completed(), first.message
    good = first.result()
    assert good["promotion"]["promoted"] is True and good["promotion"]["current_version"] is None
    assert load_card(current).version == good["model_version"]
    art = Artifact.get(key)
    assert art is not None and art.flow_run_id == first.state_details.flow_run_id and "# Promoted" in art.data

    second = _train(kit, tmp_path / "bad", current, epochs=1, lr=1e-6, promotion_tolerance=0.0)
    assert second.is_failed()
    assert "not promoted" in second.message and f"current model {good['model_version']}" in second.message
    assert load_card(current).version == good["model_version"]  # unchanged
    assert load_card(tmp_path / "bad").version != good["model_version"]  # the new model is saved in its own out
    art = Artifact.get(key)
    assert art is not None and art.flow_run_id == second.state_details.flow_run_id
    assert "# Not promoted" in art.data
    table = Artifact.get(artifact_key("train", "promotion-table", str(current)))
    assert table is not None and table.flow_run_id == second.state_details.flow_run_id
    worse = [line for line in art.data.splitlines() if line.endswith("| worse |")]
    assert worse
    for line in worse:
        task = line.split("|")[1].strip()
        assert f"task {task} " in second.message  # the Failed message names each worse task
    metrics = Artifact.get("train-metrics")  # the training's own artifacts were published before the refusal
    assert metrics is not None and metrics.flow_run_id == second.state_details.flow_run_id
