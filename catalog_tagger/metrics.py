"""Evaluation metrics in numpy (no sklearn): multiclass accuracy/macro-F1, multilabel F1/mAP, threshold tuning,
regression MAE/RMSE/R²."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Candidate thresholds for per-label tuning: fine enough to matter, coarse enough not to overfit a small val split.
THRESHOLD_GRID: tuple[float, ...] = tuple(float(x) for x in np.round(np.arange(0.05, 0.951, 0.025), 3))


def _f1(tp: np.ndarray | float, fp: np.ndarray | float, fn: np.ndarray | float) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn), and 0 where nothing was positive in truth or prediction."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows are the true class, columns the predicted one."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def multiclass_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy and macro-F1 over the classes that occur in truth or prediction (sklearn's default set).

    ``y_true`` / ``y_pred`` are class indices of the labelled examples only (missing labels removed first).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = int(y_true.size)
    if n == 0:
        return {"accuracy": None, "macro_f1": None, "n": 0}
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    seen = (cm.sum(0) + cm.sum(1)) > 0
    return {
        "accuracy": float(tp.sum() / n),
        "macro_f1": float(_f1(tp, fp, fn)[seen].mean()),
        "n": n,
    }


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the precision-recall curve as a step sum: sum_k (R_k - R_{k-1}) P_k.

    Thresholds are the distinct scores (tied scores enter together), as in sklearn's ``average_precision_score``.
    ``None`` when there is no positive example (AP is undefined).
    """
    y_true = np.asarray(y_true, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(y_true.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], y_true[order]
    # Last index of each run of equal scores: the points where the curve is evaluated.
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[ends]
    fp = (ends + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(
    y_true: np.ndarray, scores: np.ndarray, thresholds: Sequence[float] | np.ndarray, labels: Sequence[str] = ()
) -> dict[str, Any]:
    """Micro-F1, macro-F1 (at ``thresholds``, positive when score >= threshold) and mAP of an (N, L) task.

    Macro-F1 averages the labels that occur in truth or prediction; mAP averages the labels with a positive.
    """
    y_true = np.asarray(y_true, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n = int(y_true.shape[0])
    if n == 0:
        return {"micro_f1": None, "macro_f1": None, "map": None, "n": 0}
    pred = scores >= np.asarray(thresholds, dtype=np.float64)[None, :]
    tp = (pred & y_true).sum(0)
    fp = (pred & ~y_true).sum(0)
    fn = (~pred & y_true).sum(0)
    per_f1 = _f1(tp, fp, fn)
    seen = (tp + fp + fn) > 0
    aps = [average_precision(y_true[:, j], scores[:, j]) for j in range(y_true.shape[1])]
    defined = [a for a in aps if a is not None]
    out: dict[str, Any] = {
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(per_f1[seen].mean()) if seen.any() else 0.0,
        "map": float(np.mean(defined)) if defined else None,
        "n": n,
    }
    if labels:
        out["per_label"] = {
            label: {"f1": float(per_f1[j]), "ap": aps[j], "support": int(y_true[:, j].sum())}
            for j, label in enumerate(labels)
        }
    return out


def tune_thresholds(
    y_true: np.ndarray, scores: np.ndarray, grid: Sequence[float] = THRESHOLD_GRID, default: float = 0.5
) -> list[float]:
    """Per label, the grid threshold with the best F1 on these (validation) examples.

    Ties go to the threshold nearest ``default``, so flat stretches of the F1 curve do not drift to the grid's
    ends. A label with no positive example keeps ``default``: there is nothing to tune it on.
    """
    y_true = np.asarray(y_true, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    grid_arr = np.asarray(grid, dtype=np.float64)
    out: list[float] = []
    for j in range(y_true.shape[1]):
        y = y_true[:, j]
        if not y.any():
            out.append(float(default))
            continue
        pred = scores[:, j][:, None] >= grid_arr[None, :]  # (N, G)
        tp = (pred & y[:, None]).sum(0)
        fp = (pred & ~y[:, None]).sum(0)
        fn = (~pred & y[:, None]).sum(0)
        f1 = _f1(tp, fp, fn)
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
        pick = best[np.argmin(np.abs(grid_arr[best] - default))]
        out.append(float(grid_arr[pick]))
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE and R² (1 - SSE / total sum of squares around the truth's mean) of the labelled examples.

    In the target's own units (de-normalised). R² is None when the truth does not vary (it is undefined), and every
    figure None without examples. ``baseline_mae`` is the MAE of predicting the truth's mean: what a head that
    learnt nothing would score, to read ``mae`` against.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    n = int(y_true.size)
    if n == 0:
        return {"mae": None, "rmse": None, "r2": None, "baseline_mae": None, "n": 0}
    err = y_pred - y_true
    total = float(((y_true - y_true.mean()) ** 2).sum())
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": float(1.0 - (err**2).sum() / total) if total > 0 else None,
        "baseline_mae": float(np.abs(y_true - y_true.mean()).mean()),
        "n": n,
    }
