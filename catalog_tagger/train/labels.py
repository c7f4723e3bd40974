"""The labels table: read it (Parquet or CSV, any fsspec URL), check it against tasks.yaml, turn it into targets."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalog_tagger.config import TaskConfig
from catalog_tagger.errors import UserError
from catalog_tagger.kinds import kind_of
from catalog_tagger.storage import is_local, join, read_uri_table, strip

log = logging.getLogger(__name__)

SHOW_UNKNOWN = 20  # unknown label values named in the error; the rest are counted


@dataclass
class LabelTable:
    """Validated labels: resolved image URIs and, per task, targets (-1 where the label is missing).

    Multiclass targets are int64 (N,) class indices; multilabel targets are float32 (N, L) 0/1 rows, and a
    whole row of -1 when the image has no label for that task.
    """

    uris: list[str]
    targets: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.uris)

    def subset(self, idx: np.ndarray) -> LabelTable:
        """The rows ``idx``, in that order."""
        return LabelTable(uris=[self.uris[i] for i in idx], targets={k: v[idx] for k, v in self.targets.items()})


def is_missing(v: Any) -> bool:
    """An empty cell: None, NaN, or a blank string."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def load_labels(uri: str, tasks: TaskConfig, storage_options: dict[str, Any] | None = None) -> LabelTable:
    """Read and validate the labels table against ``tasks``; every problem is reported before any work."""
    # Every CSV column as text: a label written `01` or `true` must stay what tasks.yaml says.
    cols = read_uri_table(uri, storage_options, what="labels table", strings=True).to_pydict()
    source = uri.rsplit("/", 1)[-1]
    _check_columns(source, cols, tasks)
    raw_uris = cols["uri"]
    n = len(raw_uris)
    if n == 0:
        raise UserError(f"{source}: the table has no rows")
    blank = [i for i, u in enumerate(raw_uris) if is_missing(u)]
    if blank:
        raise UserError(f"{source}: {len(blank)} row(s) have no uri (first at row {blank[0]}); fill or drop them")

    unknown: Counter[tuple[str, str]] = Counter()
    targets = {t.name: kind_of(t).targets(t, cols[t.name], is_missing, unknown) for t in tasks.tasks}
    if unknown:
        raise UserError(f"{source}: {_unknown_labels(unknown)}")

    base = _table_dir(uri)
    table = LabelTable(uris=[_resolve_uri(str(u).strip(), base) for u in raw_uris], targets=targets)
    _, first = np.unique(np.asarray(table.uris, dtype=object), return_index=True)  # each uri's first row
    if first.size < n:
        # A duplicate would sit in two splits and leak test images into training.
        log.warning("%s: %d duplicate uri row(s) dropped (the first row of each uri is kept)", source, n - first.size)
        table = table.subset(np.sort(first))
    for task in tasks.tasks:
        if not kind_of(task).labelled(table.targets[task.name]).any():
            log.warning("%s: task %r has no labels at all; its head will not learn", source, task.name)
    return table


def _check_columns(source: str, cols: dict[str, list[Any]], tasks: TaskConfig) -> None:
    """A ``uri`` column and one column per task; other columns are ignored (and said so)."""
    have = sorted(cols)
    if "uri" not in cols:
        raise UserError(
            f"{source}: no 'uri' column (columns: {', '.join(have) or 'none'}); "
            "the table needs a 'uri' column with image paths (absolute or relative to the table) or URLs"
        )
    absent = [t.name for t in tasks.tasks if t.name not in cols]
    if absent:
        raise UserError(
            f"{source}: no column for task(s) {', '.join(repr(a) for a in absent)} declared in tasks.yaml "
            f"(columns: {', '.join(have)}); add the column (values may be empty) or remove the task"
        )
    extra = [c for c in have if c != "uri" and c not in tasks.names]
    if extra:
        log.info("%s: ignoring columns not in tasks.yaml: %s", source, ", ".join(extra))


def _unknown_labels(unknown: Counter[tuple[str, str]]) -> str:
    """The error text for label values tasks.yaml does not declare, most frequent first."""
    pairs = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{t}={label!r} ({c} row{'s' if c != 1 else ''})" for (t, label), c in pairs[:SHOW_UNKNOWN])
    more = f" and {len(pairs) - SHOW_UNKNOWN} more" if len(pairs) > SHOW_UNKNOWN else ""
    return (
        f"{len(pairs)} label value(s) are not in tasks.yaml: {shown}{more}; "
        "add them to the task's labels in tasks.yaml, or fix or clear them in the table"
    )


def _table_dir(uri: str) -> str:
    if is_local(uri):
        return os.path.dirname(strip(uri))
    return uri.rsplit("/", 1)[0]


def _resolve_uri(uri: str, base: str) -> str:
    """Absolute paths and URLs as they are; anything else relative to the table's folder."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return join(base, uri)


def log_label_counts(table: LabelTable, tasks: TaskConfig, source: str) -> None:
    """Per task, how many rows train it and how many are masked; warn when a multilabel task has no "no labels" row.

    An empty cell means "unknown" (the row is masked for that task); ``[]`` (an empty list) means "none of the
    labels". A multilabel task whose labelled rows all carry a label never sees a negative image, and then
    predicts some label on every image.
    """
    for task in tasks.tasks:
        kind = kind_of(task)
        y = table.targets[task.name]
        labelled = int(kind.labelled(y).sum())
        empty = kind.empty_rows(y)
        with_none = "" if empty is None else f", {empty} of them with no label ([])"
        log.info(
            "%s: task %r (%s): %d row(s) labelled%s, %d unlabelled (empty cell: masked)",
            source, task.name, task.kind, labelled, with_none, len(table) - labelled,
        )  # fmt: skip
        if empty == 0 and labelled:
            log.warning(
                "%s: multilabel task %r has no row with no label, so the model will learn to put a label on "
                "every image; write [] (an empty list) for images with none of the labels: an empty cell means "
                "'unknown' and is masked",
                source, task.name,
            )  # fmt: skip


def labelled_counts(table: LabelTable, tasks: TaskConfig) -> dict[str, int]:
    """Images with a label, per task (the card and the report show them)."""
    return {t.name: int(kind_of(t).labelled(table.targets[t.name]).sum()) for t in tasks.tasks}
