"""The metrics training reports (catalog_tagger.metrics), checked by hand: confusion, F1, AP, tuned thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from catalog_tagger.metrics import (
    average_precision,
    confusion_matrix,
    multiclass_metrics,
    multilabel_metrics,
    tune_thresholds,
)


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
