"""Fixtures of the training tests: a three-task config, a labels-table writer, and one synthetic catalog."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_tagger.config import TaskConfig, parse_tasks


@pytest.fixture(scope="session")
def three_tasks() -> TaskConfig:
    """Two multiclass tasks and a multilabel one (no catalog needed)."""
    return parse_tasks(
        {
            "tasks": [
                {"name": "shape", "kind": "multiclass", "labels": ["square", "circle", "star"]},
                {"name": "color", "kind": "multiclass", "labels": ["red", "green"]},
                {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo", "text"]},
            ]
        }
    )


@pytest.fixture(scope="session")
def write_labels():
    """``write(path, rows) -> str``: a Parquet labels table from a list of row dicts."""

    def write(path, rows: list[dict]) -> str:
        pq.write_table(pa.Table.from_pylist(rows), str(path))
        return str(path)

    return write


@pytest.fixture(scope="session")
def catalog(catalog_kit):
    """The synthetic catalog the end-to-end training tests share (80 images, 4 tasks)."""
    return catalog_kit(images=80, seed=3, name="train-catalog")["synth"]


@pytest.fixture(scope="session")
def tiny_cfg(catalog):
    """``make(out, **overrides) -> TrainConfig``: a seconds-long training run on ``catalog``."""
    from catalog_tagger.train.config import TrainConfig

    def make(out, **kw) -> TrainConfig:
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

    return make
