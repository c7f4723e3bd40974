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
from catalog_tagger.kinds import KINDS, denormalise, kind_of, normalise

TASKS = {
    "multiclass": TaskSpec(name="color", kind="multiclass", labels=("red", "green", "blue")),
    "multilabel": TaskSpec(name="badges", kind="multilabel", labels=("sale", "logo"), threshold=0.4),
    "regression": TaskSpec(name="price", kind="regression", range=(10.0, 110.0)),
}
LABEL_TASKS = sorted(k for k in TASKS if k != "regression")


def test_the_config_accepts_exactly_the_registered_kinds() -> None:
    assert set(get_args(TaskKind)) == set(KINDS) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_columns_fit_the_declared_fields(name: str) -> None:
    task = TASKS[name]
    kind = kind_of(task)
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])[:, : kind.outputs(task)]
    probs = kind.activate(logits).numpy()
    cols = kind.columns(task, probs, [task.effective_threshold] * len(task.labels))
    fields = kind.fields(task)
    assert list(cols) == [f.name for f in fields]
    table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in fields], schema=pa.schema(fields))
    assert table.num_rows == 2
    pred = kind.prediction(task, cols, 1)
    assert pred.get("label", pred.get("value")) == cols[task.name][1]


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
    values = {"multiclass": ["red", None, "blue"], "multilabel": [["sale"], None, "logo|sale"]}.get(
        name, ["12.5", None, 99]
    )
    unknown: Counter[object] = Counter()
    y = kind.targets(task, values, lambda v: v is None, unknown)
    assert not unknown
    assert kind.labelled(y).tolist() == [True, False, True]
    logits = torch.zeros((3, kind.outputs(task)), requires_grad=True)
    per, mask = kind.loss(task, logits, torch.from_numpy(y))
    assert mask.tolist() == [1.0, 0.0, 1.0]
    (per * mask).sum().backward()
    assert logits.grad is not None and torch.all(logits.grad[1] == 0)  # the unlabelled row adds no gradient


def test_unknown_labels_are_counted_not_guessed() -> None:
    task = TASKS["multiclass"]
    unknown: Counter[object] = Counter()
    y = kind_of(task).targets(task, ["red", "mauve"], lambda v: v is None, unknown)
    assert y.tolist() == [0, -1] and unknown == Counter({("color", "mauve"): 1})


# --------------------------------------------------------------------------------------------- regression
REG = TASKS["regression"]


def test_regression_normalisation_round_trips_and_outputs_the_target_units() -> None:
    values = np.array([10.0, 35.0, 110.0, 160.0])
    scaled = normalise(REG, values)
    assert scaled.tolist() == [0.0, 0.25, 1.0, 1.5]  # outside the range is allowed: only an affine map
    assert denormalise(REG, scaled) == pytest.approx(values)
    plain = TaskSpec(name="age", kind="regression")  # no range: the head predicts the target as it is
    assert normalise(plain, values) is values and denormalise(plain, values) is values
    cols = kind_of(REG).columns(REG, np.array([[0.25], [1.0]], dtype=np.float32), [])
    assert cols["price"].dtype == np.float32 and cols["price"].tolist() == [35.0, 110.0]
    assert kind_of(REG).prediction(REG, cols, 0) == {"value": 35.0}


def test_regression_targets_parse_numbers_mask_blanks_and_count_the_rest() -> None:
    unknown: Counter[object] = Counter()
    cells = ["12.5", " 40 ", 7, 3.25, None, float("nan"), "", "cheap", "inf", ["1"]]
    missing = lambda v: v is None or (isinstance(v, float) and v != v) or v == ""  # noqa: E731
    y = kind_of(REG).targets(REG, cells, missing, unknown)
    assert y.dtype == np.float32
    assert y[:4].tolist() == [12.5, 40.0, 7.0, 3.25]
    assert kind_of(REG).labelled(y).tolist() == [True] * 4 + [False] * 6
    assert unknown == Counter({("price", "cheap"): 1, ("price", "inf"): 1, ("price", "<a list: ['1']>"): 1})
    # A negative number is a label like any other (no -1 sentinel for this kind).
    assert kind_of(REG).labelled(kind_of(REG).targets(REG, ["-1"], missing, Counter())).tolist() == [True]


@pytest.mark.parametrize("loss", ["huber", "mse"])
def test_regression_loss_is_on_the_normalised_target_and_masks_missing_ones(loss: str) -> None:
    task = REG.model_copy(update={"loss": loss})
    y = torch.tensor([60.0, float("nan"), 110.0, 10.0])  # normalised: 0.5, missing, 1.0, 0.0
    logits = torch.tensor([[0.5], [7.0], [3.0], [0.2]], requires_grad=True)
    per, mask = kind_of(task).loss(task, logits, y)
    assert mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    err = torch.tensor([0.0, 0.0, 2.0, 0.2])
    want = 0.5 * err**2 if loss == "huber" else err**2
    if loss == "huber":
        want[2] = 1.0 * (2.0 - 0.5)  # beyond delta 1: linear
    assert (per * mask).tolist() == pytest.approx(want.tolist())
    (per * mask).sum().backward()
    assert logits.grad is not None and logits.grad[1, 0] == 0.0 and torch.isfinite(logits.grad).all()


def test_regression_metrics_match_a_hand_computation() -> None:
    y = np.array([20.0, 30.0, np.nan, 60.0], dtype=np.float32)
    scores = normalise(REG, np.array([[22.0], [27.0], [999.0], [66.0]]))
    m = kind_of(REG).metrics(REG, y, scores, None)
    # errors 2, -3, 6 (the missing row is left out); truth mean 36.67
    assert m["n"] == 3
    assert m["mae"] == pytest.approx((2 + 3 + 6) / 3)
    assert m["rmse"] == pytest.approx(np.sqrt((4 + 9 + 36) / 3))
    ss_tot = (20 - 110 / 3) ** 2 + (30 - 110 / 3) ** 2 + (60 - 110 / 3) ** 2
    assert m["r2"] == pytest.approx(1 - 49 / ss_tot)
    assert m["baseline_mae"] == pytest.approx((abs(20 - 110 / 3) + abs(30 - 110 / 3) + abs(60 - 110 / 3)) / 3)
    assert kind_of(REG).tune(y, scores) is None
    assert "mae 3.667" in kind_of(REG).describe(m)


def test_lower_is_better_for_the_regression_headline() -> None:
    reg, mc = kind_of(REG), kind_of(TASKS["multiclass"])
    assert reg.headline[0] == "mae" and not reg.higher_is_better
    assert reg.better(0.1, 0.2) and not reg.better(0.3, 0.2)
    assert mc.better(0.9, 0.8) and not mc.better(0.7, 0.8)
    assert reg.better(0.5, None) and not reg.better(None, 0.5)


def test_the_regression_head_is_one_output_starting_mid_range() -> None:
    from catalog_tagger.config import parse_tasks
    from catalog_tagger.model.multihead import MultiHeadModel

    tasks = parse_tasks({"tasks": [TASKS["multiclass"].model_dump(), REG.model_dump()]})
    model = MultiHeadModel(backbone="tiny_cnn", tasks=tasks)
    assert model.heads["price"].out_features == 1 and model.heads["color"].out_features == 3
    assert model.heads["price"].bias.tolist() == [0.5]  # the middle of [0, 1], where the range maps the target


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"labels": ["a"]}, "labels"),
        ({"threshold": 0.3}, "threshold"),
        ({"range": [5, 5]}, "range"),
        ({"range": [9, 1]}, "range"),
        ({"range": [0, float("inf")]}, "range"),
        ({"loss": "l1"}, "loss"),
    ],
)
def test_a_malformed_regression_task_is_refused_by_field(task: dict[str, object], field: str) -> None:
    from catalog_tagger.config import parse_tasks
    from catalog_tagger.errors import ConfigError

    with pytest.raises(ConfigError, match=f"field '{field}"):
        parse_tasks({"tasks": [{"name": "price", "kind": "regression", **task}]})


@pytest.mark.parametrize("extra", [{"range": [0, 1]}, {"loss": "mse"}])
def test_classification_tasks_refuse_the_regression_fields(extra: dict[str, object]) -> None:
    from catalog_tagger.config import parse_tasks
    from catalog_tagger.errors import ConfigError

    with pytest.raises(ConfigError, match="only regression tasks"):
        parse_tasks({"tasks": [{"name": "color", "kind": "multiclass", "labels": ["a", "b"], **extra}]})


def test_a_regression_card_round_trips(tmp_path) -> None:
    from catalog_tagger.config import parse_tasks
    from catalog_tagger.model.artifact import card_for, load_artifact, save_artifact
    from catalog_tagger.model.multihead import build_model

    spec = REG.model_copy(update={"loss": "mse"})
    tasks = parse_tasks({"tasks": [TASKS["multiclass"].model_dump(), spec.model_dump()]})
    model = build_model(backbone="tiny_cnn", tasks=tasks)
    save_artifact(model, card_for(model, image_size=16), tmp_path / "m")
    _, card = load_artifact(tmp_path / "m")
    assert card.task_config() == tasks
    assert card.tasks[0] == TASKS["multiclass"].model_dump(mode="json")  # no regression fields on other kinds
    assert card.tasks[1]["range"] == [10.0, 110.0] and card.tasks[1]["loss"] == "mse"
