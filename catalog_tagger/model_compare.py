"""Two models' predictions on the same images, task by task: agreement, the confusion between their labels, the
error between their regression outputs, and the rows whose label changed. Pure: columns in, numbers out.

The columns are the tagging job's own (``model.inference.output_columns``): a multiclass task's label and
``<task>_score``, a multilabel task's label list, a regression task's float value. A task is compared when both
models have it under the same name and kind; the rest are listed as such (never silently dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from catalog_tagger.config import TaskSpec

MULTICLASS, MULTILABEL, REGRESSION = "multiclass", "multilabel", "regression"
LIST_SEP = "|"  # a multilabel set in one text cell, as label tables write it (``kinds._multilabel_values``)

# The changed rows (``--out ROWS``): one row per image and task whose prediction differs between A and B.
CHANGES_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("task", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("label_a", pa.string()),  # multiclass: the label; multilabel: the set, "|"-joined; regression: null
        pa.field("label_b", pa.string()),
        pa.field("score_a", pa.float32()),  # multiclass: the label's probability; regression: the value; else null
        pa.field("score_b", pa.float32()),
    ]
)
# The confusion counts as a table (``ROWS/confusion.parquet``): one row per task and (label A, label B) seen.
CONFUSION_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string()),
        pa.field("label_a", pa.string()),
        pa.field("label_b", pa.string()),
        pa.field("images", pa.int64()),
    ]
)


@dataclass(frozen=True)
class TaskPair:
    """A task both models have, under the same name and kind: what is compared."""

    name: str
    kind: str
    labels_a: tuple[str, ...]
    labels_b: tuple[str, ...]


@dataclass
class TaskMatch:
    """Which tasks the two models share, and which they do not."""

    shared: list[TaskPair] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    kind_differs: list[dict[str, str]] = field(default_factory=list)  # {"task", "kind_a", "kind_b"}


def match_tasks(tasks_a: Sequence[TaskSpec], tasks_b: Sequence[TaskSpec]) -> TaskMatch:
    """The tasks of A and B by name, in A's order: shared (same kind), only in one, or of different kinds."""
    by_b = {t.name: t for t in tasks_b}
    names_a = {t.name for t in tasks_a}
    out = TaskMatch(only_b=[t.name for t in tasks_b if t.name not in names_a])
    for t in tasks_a:
        other = by_b.get(t.name)
        if other is None:
            out.only_a.append(t.name)
        elif other.kind != t.kind:
            out.kind_differs.append({"task": t.name, "kind_a": t.kind, "kind_b": other.kind})
        else:
            out.shared.append(TaskPair(t.name, t.kind, tuple(t.labels), tuple(other.labels)))
    return out


def _union(first: Sequence[str], *more: Sequence[str]) -> list[str]:
    """Labels in first-seen order, each once."""
    return list(dict.fromkeys([*first, *(x for m in more for x in m)]))


def _share(part: int, n: int) -> float | None:
    return part / n if n else None


# --------------------------------------------------------------------------------------------- per kind
def multiclass_stats(
    a: Sequence[str], b: Sequence[str], labels_a: Sequence[str] = (), labels_b: Sequence[str] = ()
) -> dict[str, Any]:
    """Agreement (share of images with the same label) and the confusion: ``counts[i][j]`` images that A labels
    ``labels_a[i]`` and B labels ``labels_b[j]`` (each model's labels in its card's order, then any other seen)."""
    rows, cols = _union(labels_a, a), _union(labels_b, b)
    ri, ci = {x: i for i, x in enumerate(rows)}, {x: j for j, x in enumerate(cols)}
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    for x, y in zip(a, b, strict=True):
        counts[ri[x], ci[y]] += 1
    n, same = len(a), sum(x == y for x, y in zip(a, b, strict=True))
    return {
        "n": n,
        "agreement": _share(same, n),
        "changed": n - same,
        "confusion": {"labels_a": rows, "labels_b": cols, "counts": counts.tolist()},
    }


def multilabel_stats(
    a: Sequence[Sequence[str]], b: Sequence[Sequence[str]], labels_a: Sequence[str] = (), labels_b: Sequence[str] = ()
) -> dict[str, Any]:
    """Per label: the share of images where A and B agree on it (both on or both off) and how often each sets it;
    the mean Jaccard of the two label sets (two empty sets agree: 1); agreement is the share of identical sets."""
    sa, sb = [set(x) for x in a], [set(x) for x in b]
    n = len(sa)
    labels = _union(labels_a, labels_b, *(sorted(s) for s in sa), *(sorted(s) for s in sb))
    per_label = [
        {
            "label": lab,
            "agreement": _share(sum((lab in x) == (lab in y) for x, y in zip(sa, sb, strict=True)), n),
            "images_a": sum(lab in x for x in sa),
            "images_b": sum(lab in y for y in sb),
        }
        for lab in labels
    ]
    jaccard = [len(x & y) / len(x | y) if x | y else 1.0 for x, y in zip(sa, sb, strict=True)]
    same = sum(x == y for x, y in zip(sa, sb, strict=True))
    return {
        "n": n,
        "agreement": _share(same, n),
        "changed": n - same,
        "mean_jaccard": float(np.mean(jaccard)) if n else None,
        "per_label": per_label,
    }


def regression_stats(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The error between two regression outputs on the same images: mean and largest absolute difference, RMSE,
    both means, and how many images' values differ at all. Non-finite pairs are left out (and counted)."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"regression outputs of different lengths: {x.shape[0]} and {y.shape[0]}")
    keep = np.isfinite(x) & np.isfinite(y)
    d = np.abs(x[keep] - y[keep])
    n = int(keep.sum())
    return {
        "n": n,
        "mae": float(d.mean()) if n else None,
        "max_abs_diff": float(d.max()) if n else None,
        "rmse": float(np.sqrt((d**2).mean())) if n else None,
        "mean_a": float(x[keep].mean()) if n else None,
        "mean_b": float(y[keep].mean()) if n else None,
        "changed": int((d > 0).sum()),
        "non_finite": int((~keep).sum()),
    }


# --------------------------------------------------------------------------------------------- all tasks
@dataclass
class Compared:
    """Every shared task's statistics (in A's task order), the changed rows and the confusion counts."""

    tasks: list[dict[str, Any]]
    changes: pa.Table  # CHANGES_SCHEMA
    confusion: pa.Table  # CONFUSION_SCHEMA


def _multiclass_changes(pair: TaskPair, uris: Sequence[str], ca: dict[str, Any], cb: dict[str, Any]) -> list[Any]:
    la, lb = ca[pair.name], cb[pair.name]
    sa, sb = ca[f"{pair.name}_score"], cb[f"{pair.name}_score"]
    return [
        (u, x, y, float(sa[i]), float(sb[i])) for i, (u, x, y) in enumerate(zip(uris, la, lb, strict=True)) if x != y
    ]


def _multilabel_changes(pair: TaskPair, uris: Sequence[str], ca: dict[str, Any], cb: dict[str, Any]) -> list[Any]:
    return [
        (u, LIST_SEP.join(x), LIST_SEP.join(y), None, None)
        for u, x, y in zip(uris, ca[pair.name], cb[pair.name], strict=True)
        if set(x) != set(y)
    ]


def _regression_changes(pair: TaskPair, uris: Sequence[str], ca: dict[str, Any], cb: dict[str, Any]) -> list[Any]:
    va, vb = np.asarray(ca[pair.name], dtype=np.float32), np.asarray(cb[pair.name], dtype=np.float32)
    return [(uris[i], None, None, float(va[i]), float(vb[i])) for i in np.flatnonzero(va != vb).tolist()]


def task_stats(pair: TaskPair, ca: dict[str, Any], cb: dict[str, Any]) -> dict[str, Any]:
    """One shared task's statistics from both models' output columns on the same images."""
    name = pair.name
    if pair.kind == MULTICLASS:
        stats = multiclass_stats(list(ca[name]), list(cb[name]), pair.labels_a, pair.labels_b)
    elif pair.kind == MULTILABEL:
        stats = multilabel_stats(list(ca[name]), list(cb[name]), pair.labels_a, pair.labels_b)
    elif pair.kind == REGRESSION:
        stats = regression_stats(np.asarray(ca[name]), np.asarray(cb[name]))
    else:
        raise ValueError(f"task {name!r}: cannot compare a task of kind {pair.kind!r}")
    return {"task": name, "kind": pair.kind, **stats}


_CHANGES = {MULTICLASS: _multiclass_changes, MULTILABEL: _multilabel_changes, REGRESSION: _regression_changes}


def compare_columns(match: TaskMatch, uris: Sequence[str], cols_a: dict[str, Any], cols_b: dict[str, Any]) -> Compared:
    """Every shared task compared on the same images (``uris``, one per row of both models' columns)."""
    tasks: list[dict[str, Any]] = []
    changed: list[tuple[Any, ...]] = []
    confusion: list[tuple[Any, ...]] = []
    for pair in match.shared:
        stats = task_stats(pair, cols_a, cols_b)
        tasks.append(stats)
        changed.extend((u, pair.name, pair.kind, *rest) for u, *rest in _CHANGES[pair.kind](pair, uris, cols_a, cols_b))
        conf = stats.get("confusion")
        if conf:
            confusion.extend(
                (pair.name, la, lb, n)
                for la, row in zip(conf["labels_a"], conf["counts"], strict=True)
                for lb, n in zip(conf["labels_b"], row, strict=True)
                if n
            )
    return Compared(tasks, _table(changed, CHANGES_SCHEMA), _table(confusion, CONFUSION_SCHEMA))


def _table(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
    columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in schema]
    return pa.table([pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)
