"""The interface every task kind implements (``Kind``), and what the kinds share. ``kinds.py`` registers them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch

    from catalog_tagger.config import TaskSpec

Columns = dict[str, Any]  # output column name -> per-row values (list or array)
IsMissing = Callable[[Any], bool]


class Kind:
    """One kind of head. Subclasses are stateless; ``KINDS`` maps the ``kind`` string to the instance."""

    name: ClassVar[str]
    headline: ClassVar[tuple[str, ...]]  # metric keys logged per epoch; the first one compares models
    higher_is_better: ClassVar[bool] = True  # of the first headline metric (False for an error such as MAE)
    score_column: ClassVar[str]  # suffix of the score column: "_score" or "_scores"; "" when the kind has none
    stratifies: ClassVar[bool] = False  # one discrete label per image: the training split can be stratified on it
    numeric: ClassVar[bool] = False  # the output is a number, not labels: shown as a histogram, never counted by label

    def check(self, task: TaskSpec) -> None:
        """Raise ValueError ("<field>: <reason>") when a task of this kind is not well formed."""
        raise NotImplementedError

    def outputs(self, task: TaskSpec) -> int:
        """Width of the task's head: one logit per label."""
        return len(task.labels)

    def init_head(self, task: TaskSpec, head: torch.nn.Linear) -> None:
        """Adjust a new head's initialisation (random init as it is, unless the kind knows better)."""

    def better(self, a: float | None, b: float | None) -> bool:
        """Whether headline value ``a`` beats ``b`` (by this kind's direction); a missing value never beats."""
        if a is None:
            return False
        if b is None:
            return True
        return a > b if self.higher_is_better else a < b

    def fields(self, task: TaskSpec) -> list[pa.Field]:
        """The output columns of one task, in schema order."""
        raise NotImplementedError

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities (softmax or sigmoid)."""
        raise NotImplementedError

    def columns(self, task: TaskSpec, probs: np.ndarray, thresholds: Sequence[float]) -> Columns:
        """Probabilities (B, L) -> this task's output columns for B rows."""
        raise NotImplementedError

    def prediction(self, task: TaskSpec, cols: Columns, row: int) -> dict[str, Any]:
        """One row of ``columns`` as a JSON-able prediction (``predict --json``)."""
        raise NotImplementedError

    def targets(self, task: TaskSpec, values: Sequence[Any], missing: IsMissing, unknown: Counter[Any]) -> np.ndarray:
        """Label-table values -> training targets (-1 marks a missing label); unknown labels are counted."""
        raise NotImplementedError

    def loss(self, task: TaskSpec, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-image loss, mask of labelled images) for one batch."""
        raise NotImplementedError

    def metrics(
        self, task: TaskSpec, y: np.ndarray, scores: np.ndarray, thresholds: Sequence[float] | None
    ) -> dict[str, Any]:
        """Test/val metrics over labelled rows."""
        raise NotImplementedError

    def tune(self, y: np.ndarray, scores: np.ndarray) -> list[float] | None:
        """Per-label thresholds tuned on validation rows, or None when the kind has none."""
        raise NotImplementedError

    def describe(self, m: dict[str, Any]) -> str:
        """A short human summary of ``metrics``' result for logs."""
        return ", ".join(f"{k} {format_metric(m.get(k))}" for k in self.headline) + f" (n={m.get('n', 0)})"

    def empty_rows(self, y: np.ndarray) -> int | None:  # noqa: ARG002 - a kind without "no labels" rows
        """Labelled rows that carry none of the labels (a multilabel "no labels" row); None for a kind without."""
        return None

    @staticmethod
    def labelled(y: np.ndarray) -> np.ndarray:
        """Rows that carry a label (targets use -1 for missing)."""
        return y >= 0 if y.ndim == 1 else y[:, 0] >= 0


def no_regression_fields(task: TaskSpec) -> None:
    """A classification task refuses the fields only a regression task has."""
    if task.range is not None:
        raise ValueError(f"range: only regression tasks have a range (this task is {task.kind})")
    if task.loss is not None:
        raise ValueError(f"loss: only regression tasks choose a loss (this task is {task.kind})")


def format_metric(v: float | None) -> str:
    """A metric for people: three decimals, or "-" when there was nothing to measure."""
    return "-" if v is None else f"{v:.3f}"
