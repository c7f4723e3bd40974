"""The report's history: every committed run of an output up to the reported one (the last N), with its counts,
wall time, savings, label distribution per task and share of low-confidence predictions.

Per-run figures come from the runs' manifests (their Delta commits). Label counts and confidence come from a
manifest's ``profile`` when it has one; runs written before profiles existed are read from the history table with
one grouped DuckDB query per task (run id, status and the task's columns only). ``report_history_svg`` draws it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from catalog_tagger.kinds import Kind
from catalog_tagger.query import Catalog, run_sql, sql_ident, sql_string
from catalog_tagger.schema import STATUS_OK

# The profile's own SQL per kind (a row's labels as a list, its confidence): a run profiled when it was tagged and
# one read here from its rows give the same figures.
from catalog_tagger.tag.profile import KIND_SQL as PROFILE_SQL

log = logging.getLogger(__name__)

DEFAULT_HISTORY_RUNS = 60  # runs shown at most (the latest ones): bounds the page and the rows read
LOW_CONFIDENCE = 0.5  # a prediction whose confidence (tag/profile.py) is under this is "low confidence"


class TaskLike(Protocol):
    """What the history needs of a task (``report_html.TaskInfo`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def multi(self) -> bool: ...


@dataclass(frozen=True)
class RunPoint:
    """One committed run's figures, from its manifest."""

    run_id: str
    run_date: str | None
    finished_at: str | None
    ok: int  # images tagged ok
    error: int  # error rows
    wall_s: float | None
    accel_hours_saved: float | None  # busy view; None: no single-task figures (not calibrated)
    cost_saved: float | None  # busy view; None: not priced
    cum_accel_hours_saved: float | None  # summed over every committed run up to this one; None: none measured yet
    cum_cost_saved: float | None  # summed over the priced runs up to this one; None: none priced yet

    @property
    def error_rate(self) -> float | None:
        """Error rows / rows committed; None for a run that committed no rows."""
        rows = self.ok + self.error
        return self.error / rows if rows else None


@dataclass
class TaskHistory:
    """One task across the shown runs (a run without the task has no entry)."""

    name: str
    kind: str
    labels: list[str]  # configured labels in order, then any other label seen
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # run id -> label -> ok rows with it
    rows: dict[str, int] = field(default_factory=dict)  # run id -> ok rows
    mean_confidence: dict[str, float | None] = field(default_factory=dict)  # run id -> mean confidence
    low_share: dict[str, float | None] = field(default_factory=dict)  # run id -> share of low-confidence rows
    source: dict[str, str] = field(default_factory=dict)  # run id -> "profile" (manifest) or "rows" (history)


@dataclass
class History:
    """The history section's data: runs oldest first."""

    runs: list[RunPoint]
    tasks: list[TaskHistory]
    committed: int  # committed runs up to the reported one; the page shows the last ``limit`` of them
    limit: int
    low_confidence: float


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def run_points(manifests: list[dict[str, Any]]) -> list[RunPoint]:
    """Every manifest's figures, in the given (commit) order, with running totals of the savings."""
    points: list[RunPoint] = []
    cum_h: float | None = None
    cum_cost: float | None = None
    for m in manifests:
        counts, timings, savings = m.get("counts") or {}, m.get("timings") or {}, m.get("savings") or {}
        hours, cost = _number(savings.get("accel_hours_saved")), _number(savings.get("cost_saved"))
        if hours is not None:
            cum_h = (cum_h or 0.0) + hours
        if cost is not None:
            cum_cost = (cum_cost or 0.0) + cost
        points.append(
            RunPoint(
                run_id=str(m.get("run_id")),
                run_date=m.get("run_date"),
                finished_at=m.get("finished_at"),
                ok=int(counts.get("ok") or 0),
                error=int(counts.get("error") or 0),
                wall_s=_number(timings.get("wall_s")),
                accel_hours_saved=hours,
                cost_saved=cost,
                cum_accel_hours_saved=cum_h,
                cum_cost_saved=cum_cost,
            )
        )
    return points


def manifest_profile(manifest: dict[str, Any], task: str) -> dict[str, Any] | None:
    """The task's entry of the manifest's ``profile``; None when the manifest (older versions) has none."""
    profile = manifest.get("profile")
    tasks = profile.get("tasks") if isinstance(profile, dict) else None
    entry = tasks.get(task) if isinstance(tasks, dict) else None
    return entry if isinstance(entry, dict) else None


def _runs_where(manifests: list[dict[str, Any]]) -> str:
    """The ok rows of these runs; their partitions named too, so only those are read."""
    ids = ", ".join(sql_string(str(m["run_id"])) for m in manifests)
    where = f"status = {sql_string(STATUS_OK)} AND run_id IN ({ids})"
    dates = sorted({m["run_date"] for m in manifests if m.get("run_date")})
    if dates and all(m.get("run_date") for m in manifests):
        where += " AND run_date IN (" + ", ".join(f"DATE {sql_string(d)}" for d in dates) + ")"
    return where


def _from_rows(cat: Catalog, manifests: list[dict[str, Any]], task: TaskLike, th: TaskHistory, low: float) -> None:
    """Fill ``th`` for runs without a profile from their committed rows, as ``tag/profile.py`` counts them: the ok
    rows that carry the task's prediction, their labels, and their confidence."""
    columns = {row[0] for row in cat.con.sql("DESCRIBE predictions").fetchall()}
    sql = PROFILE_SQL.get(task.kind.name)
    if sql is None or not {task.name, task.name + task.kind.score_column} <= columns:
        log.warning("history: no figures for task %r from its rows (kind %s)", task.name, task.kind.name)
        return
    c = task.name  # a valid column name (config.py), as the profile's SQL expects
    where = f"{_runs_where(manifests)} AND {sql_ident(c)} IS NOT NULL"
    found = run_sql(
        cat.con,
        f"SELECT run_id, label, count(*) AS n FROM (SELECT run_id, unnest({sql.labels.format(c=c)}) AS label "
        f"FROM predictions WHERE {where}) GROUP BY run_id, label",
    ).to_pylist()
    conf = sql.confidence.format(c=c)
    per_run = run_sql(
        cat.con,
        f"SELECT run_id, count(*) AS n, count(c) AS scored, avg(c) AS mean, count(*) FILTER (c < ?) AS low "
        f"FROM (SELECT run_id, {conf} AS c FROM predictions WHERE {where}) GROUP BY run_id",
        [low],
    ).to_pylist()
    for m in manifests:
        rid = str(m["run_id"])
        th.counts[rid], th.rows[rid], th.source[rid] = {}, 0, "rows"
        th.mean_confidence[rid] = th.low_share[rid] = None
    for r in found:
        th.counts[r["run_id"]][str(r["label"])] = int(r["n"])
    for r in per_run:
        rid = r["run_id"]
        th.rows[rid] = int(r["n"])
        th.mean_confidence[rid] = r["mean"]
        th.low_share[rid] = r["low"] / r["scored"] if r["scored"] else None


def task_history(cat: Catalog, manifests: list[dict[str, Any]], task: TaskLike, low: float) -> TaskHistory:
    """One task across ``manifests``: from each manifest's profile, else (one query for all such runs) its rows."""
    th = TaskHistory(task.name, task.kind.name, list(task.labels))
    unprofiled = []
    for m in manifests:
        entry = manifest_profile(m, task.name)
        rid = str(m.get("run_id"))
        if entry is None:
            if task.name in (m.get("tasks") or []):
                unprofiled.append(m)
            continue
        th.counts[rid] = {str(k): int(v) for k, v in (entry.get("labels") or {}).items()}
        th.rows[rid] = int(entry.get("rows") or 0)
        th.mean_confidence[rid] = _number(entry.get("mean_confidence"))
        th.low_share[rid] = _number(entry.get("low_confidence_share"))
        th.source[rid] = "profile"
    if unprofiled:
        log.debug("history of %s: %d run(s) without a profile read from rows", task.name, len(unprofiled))
        _from_rows(cat, unprofiled, task, th, low)
    seen = {label for c in th.counts.values() for label in c}
    th.labels += sorted(seen - set(th.labels), key=_bin_order if task.kind.numeric else None)
    return th


def _bin_order(label: str) -> tuple[float, str]:
    """A regression task's profile bins (``tag/profile.bin_labels``: ``< lo``, ``[a, b)``, ``>= hi``) in value order."""
    try:
        if label.startswith("< "):
            return (-math.inf, label)
        if label.startswith(">= "):
            return (math.inf, label)
        return (float(label.strip("[").split(",")[0]), label)
    except ValueError:
        return (math.inf, label)


def gather_history(
    cat: Catalog,
    run_id: str,
    tasks: Sequence[TaskLike],
    *,
    limit: int = DEFAULT_HISTORY_RUNS,
    low_confidence: float = LOW_CONFIDENCE,
) -> History:
    """The committed runs up to and including ``run_id`` (the last ``limit`` shown; savings summed over all)."""
    ids = [m.get("run_id") for m in cat.manifests]
    upto = cat.manifests[: ids.index(run_id) + 1] if run_id in ids else list(cat.manifests)
    shown = upto[-limit:] if limit > 0 else []
    points = run_points(upto)[len(upto) - len(shown) :]
    return History(
        runs=points,
        tasks=[task_history(cat, shown, t, low_confidence) for t in tasks],
        committed=len(upto),
        limit=limit,
        low_confidence=low_confidence,
    )
