"""Every task kind keeps its promises: the columns it makes fit the fields it declares, its loss masks missing
labels, and the config accepts exactly the kinds that exist."""

from __future__ import annotations

from collections import Counter
from typing import get_args

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalog_tagger.config import TaskKind, TaskSpec
from catalog_tagger.kinds import KINDS, kind_of

TASKS = {
    "multiclass": TaskSpec(name="color", kind="multiclass", labels=("red", "green", "blue")),
    "multilabel": TaskSpec(name="badges", kind="multilabel", labels=("sale", "logo"), threshold=0.4),
}


def test_the_config_accepts_exactly_the_registered_kinds() -> None:
    assert set(get_args(TaskKind)) == set(KINDS) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_columns_fit_the_declared_fields(name: str) -> None:
    task = TASKS[name]
    kind = kind_of(task)
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])[:, : len(task.labels)]
    probs = kind.activate(logits).numpy()
    cols = kind.columns(task, probs, [task.effective_threshold] * len(task.labels))
    fields = kind.fields(task)
    assert list(cols) == [f.name for f in fields]
    table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in fields], schema=pa.schema(fields))
    assert table.num_rows == 2
    pred = kind.prediction(task, cols, 1)
    assert pred["label"] == cols[task.name][1]


def test_multiclass_picks_the_arg_max_and_multilabel_applies_thresholds() -> None:
    mc, ml = TASKS["multiclass"], TASKS["multilabel"]
    cols = kind_of(mc).columns(mc, np.array([[0.1, 0.7, 0.2]], dtype=np.float32), [])
    assert cols["color"] == ["green"] and cols["color_score"][0] == pytest.approx(0.7)
    cols = kind_of(ml).columns(ml, np.array([[0.45, 0.39]], dtype=np.float32), [0.4, 0.4])
    assert cols["badges"] == [["sale"]]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_targets_mark_missing_labels_and_the_loss_masks_them(name: str) -> None:
    task = TASKS[name]
    kind = kind_of(task)
    values = ["red", None, "blue"] if name == "multiclass" else [["sale"], None, "logo|sale"]
    unknown: Counter[object] = Counter()
    y = kind.targets(task, values, lambda v: v is None, unknown)
    assert not unknown
    assert kind.labelled(y).tolist() == [True, False, True]
    logits = torch.zeros((3, len(task.labels)), requires_grad=True)
    per, mask = kind.loss(logits, torch.from_numpy(y))
    assert mask.tolist() == [1.0, 0.0, 1.0]
    (per * mask).sum().backward()
    assert logits.grad is not None and torch.all(logits.grad[1] == 0)  # the unlabelled row adds no gradient


def test_unknown_labels_are_counted_not_guessed() -> None:
    task = TASKS["multiclass"]
    unknown: Counter[object] = Counter()
    y = kind_of(task).targets(task, ["red", "mauve"], lambda v: v is None, unknown)
    assert y.tolist() == [0, -1] and unknown == Counter({("color", "mauve"): 1})
