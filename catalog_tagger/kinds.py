"""What a task's kind means, in one place: validation, activation, output columns, targets, loss and metrics.

Every place that used to branch on ``task.kind`` asks ``kind_of(task)`` instead, so a new kind is one class here
plus its registration, not twenty edits (``Regression`` was added that way). torch is imported inside the methods
that need it: the config and the CLI's validation stay light.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from typing_extensions import override

if TYPE_CHECKING:
    import torch

    from catalog_tagger.config import TaskSpec

from catalog_tagger.kind_base import Columns, IsMissing, Kind, format_metric, no_regression_fields
from catalog_tagger.kind_regression import Regression, denormalise, normalise

__all__ = ["KINDS", "Columns", "IsMissing", "Kind", "denormalise", "format_metric", "kind_of", "normalise"]


class Multiclass(Kind):
    """Softmax over the labels; one label per image (the arg-max) and its probability."""

    name = "multiclass"
    headline = ("accuracy", "macro_f1")
    score_column = "_score"
    stratifies = True

    @override
    def check(self, task: TaskSpec) -> None:
        if len(task.labels) < 2:
            raise ValueError("labels: a multiclass task needs at least 2 labels")
        if task.threshold is not None:
            raise ValueError("threshold: only multilabel tasks have a threshold")
        no_regression_fields(task)

    @override
    def fields(self, task: TaskSpec) -> list[pa.Field]:
        return [
            pa.field(task.name, pa.string()),  # the arg-max label
            pa.field(f"{task.name}_score", pa.float32()),  # its softmax probability
        ]

    @override
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    @override
    def columns(self, task: TaskSpec, probs: np.ndarray, thresholds: Sequence[float]) -> Columns:
        idx = probs.argmax(-1)
        return {
            task.name: [task.labels[i] for i in idx.tolist()],
            f"{task.name}_score": probs[np.arange(len(idx)), idx].astype(np.float32),
        }

    @override
    def prediction(self, task: TaskSpec, cols: Columns, row: int) -> dict[str, Any]:
        return {"label": cols[task.name][row], "score": float(cols[f"{task.name}_score"][row])}

    @override
    def targets(self, task: TaskSpec, values: Sequence[Any], missing: IsMissing, unknown: Counter[Any]) -> np.ndarray:
        index = task.label_index()
        y = np.full(len(values), -1, dtype=np.int64)
        for i, v in enumerate(values):
            if missing(v):
                continue
            if isinstance(v, (list, tuple, np.ndarray)):
                unknown[(task.name, f"<a list: {list(v)}>")] += 1
                continue
            label = str(v).strip()
            if label in index:
                y[i] = index[label]
            else:
                unknown[(task.name, label)] += 1
        return y

    @override
    def loss(self, task: TaskSpec, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), y.clamp(min=0), reduction="none"), (y >= 0).float()

    @override
    def metrics(
        self, task: TaskSpec, y: np.ndarray, scores: np.ndarray, thresholds: Sequence[float] | None
    ) -> dict[str, Any]:
        from catalog_tagger.metrics import multiclass_metrics

        m = self.labelled(y)
        return multiclass_metrics(y[m], scores[m].argmax(1), len(task.labels))

    @override
    def tune(self, y: np.ndarray, scores: np.ndarray) -> list[float] | None:
        return None  # one label per image: the arg-max needs no threshold


class Multilabel(Kind):
    """A sigmoid per label; every label at or over its threshold, and every label's probability."""

    name = "multilabel"
    headline = ("micro_f1", "macro_f1", "map")
    score_column = "_scores"

    @override
    def check(self, task: TaskSpec) -> None:
        if len(task.labels) < 1:
            raise ValueError("labels: a multilabel task needs at least 1 label")
        t = task.effective_threshold
        if not 0.0 < t < 1.0:
            raise ValueError(f"threshold: {t} is outside (0, 1)")
        no_regression_fields(task)

    @override
    def fields(self, task: TaskSpec) -> list[pa.Field]:
        return [
            pa.field(task.name, pa.list_(pa.string())),  # labels at or over their threshold
            pa.field(f"{task.name}_scores", pa.list_(pa.float32())),  # sigmoid per label, in label order
        ]

    @override
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    @override
    def columns(self, task: TaskSpec, probs: np.ndarray, thresholds: Sequence[float]) -> Columns:
        probs = probs.astype(np.float32)
        on = probs >= np.asarray(thresholds, dtype=np.float32)
        return {
            task.name: [[task.labels[j] for j in np.flatnonzero(row)] for row in on],
            f"{task.name}_scores": list(probs),
        }

    @override
    def prediction(self, task: TaskSpec, cols: Columns, row: int) -> dict[str, Any]:
        return {
            "label": list(cols[task.name][row]),
            "scores": [float(s) for s in cols[f"{task.name}_scores"][row]],
            "labels": list(task.labels),
        }

    @override
    def targets(self, task: TaskSpec, values: Sequence[Any], missing: IsMissing, unknown: Counter[Any]) -> np.ndarray:
        index = task.label_index()
        y = np.full((len(values), len(task.labels)), -1.0, dtype=np.float32)
        for i, v in enumerate(values):
            labels = _multilabel_values(v, missing)
            if labels is None:
                continue
            y[i] = 0.0
            for label in labels:
                if label in index:
                    y[i, index[label]] = 1.0
                else:
                    unknown[(task.name, label)] += 1
        return y

    @override
    def empty_rows(self, y: np.ndarray) -> int | None:
        return int((y[self.labelled(y)] <= 0).all(axis=1).sum())

    @override
    def loss(self, task: TaskSpec, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        # Summed over labels: each label is its own binary decision, and a mean would shrink every label's
        # gradient as labels are added (with 3 badges, to a third of a multiclass task's).
        per = F.binary_cross_entropy_with_logits(logits.float(), y.clamp(min=0), reduction="none").sum(1)
        return per, (y[:, 0] >= 0).float()

    @override
    def metrics(
        self, task: TaskSpec, y: np.ndarray, scores: np.ndarray, thresholds: Sequence[float] | None
    ) -> dict[str, Any]:
        from catalog_tagger.metrics import multilabel_metrics

        m = self.labelled(y)
        thr = thresholds or [task.effective_threshold] * len(task.labels)
        return multilabel_metrics(y[m] > 0.5, scores[m], thr, labels=task.labels)

    @override
    def tune(self, y: np.ndarray, scores: np.ndarray) -> list[float] | None:
        from catalog_tagger.metrics import tune_thresholds

        m = self.labelled(y)
        return tune_thresholds(y[m] > 0.5, scores[m], default=0.5)


def _multilabel_values(v: Any, missing: IsMissing) -> list[str] | None:
    """A multilabel cell as a list of labels; None when missing. CSV cells are ``a|b``; ``[]`` is "no labels"."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x).strip() for x in v if not missing(x)]
    if missing(v):
        return None
    s = str(v).strip()
    if s == "[]":
        return []
    return [p.strip() for p in s.split("|") if p.strip()]


KINDS: dict[str, Kind] = {k.name: k for k in (Multiclass(), Multilabel(), Regression())}


def kind_of(task: TaskSpec) -> Kind:
    """The behaviour of ``task``'s kind."""
    return KINDS[task.kind]
