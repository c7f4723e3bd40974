"""Drift between runs: each task's label distribution (population stability index) and mean confidence compared
with the pooled profiles of the previous runs (``tag/profile.py`` makes a profile; the run manifest keeps it).

PSI = sum over labels of (p - q) * ln(p / q), p this run's share of a label and q the previous runs' pooled share
(a label absent on one side counts as ``EPSILON``): 0 when nothing moved; by the usual rule of thumb under 0.1 is
stable, 0.1-0.2 a moderate shift, 0.2 and over a significant one.

A regression task's profile counts its values per bin of its ``range`` under ``labels``, so the same PSI compares
its distribution; one without a range has no bins and gets no verdict (nor does any task without a confidence).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

EPSILON = 1e-4  # share given to a label absent on one side, so that its term is finite (and large)


@dataclass(frozen=True)
class DriftConfig:
    """When a run's profile is a warning."""

    psi_warn: float = 0.2  # a task's PSI at or over this is a warning (0.2: a significant shift)
    min_rows: int = 50  # a task with fewer rows (in this run, or in a previous one) takes no part: too noisy
    window: int = 7  # the previous runs pooled as the reference (the latest ones)
    confidence_drop: float = 0.1  # a fall of the mean confidence by more than this (absolute) is a warning


def psi(current: Mapping[str, int], reference: Mapping[str, int], *, epsilon: float = EPSILON) -> float:
    """Population stability index between two label counts (the union of their labels; zero shares -> epsilon)."""
    n_cur, n_ref = sum(current.values()), sum(reference.values())
    if n_cur <= 0 or n_ref <= 0:
        raise ValueError("psi: both distributions need at least one count")
    total = 0.0
    for label in set(current) | set(reference):
        p = max(current.get(label, 0) / n_cur, epsilon)
        q = max(reference.get(label, 0) / n_ref, epsilon)
        total += (p - q) * math.log(p / q)
    return total


def profiles_of(manifests: Iterable[Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """The profiles of run manifests, in their order; a manifest without one (older runs) is left out."""
    out = []
    for m in manifests:
        prof = (m or {}).get("profile")
        if isinstance(prof, dict) and isinstance(prof.get("tasks"), dict):
            out.append(prof)
    return out


def _tasks(profile: Mapping[str, Any] | None) -> dict[str, Any]:
    tasks = (profile or {}).get("tasks")
    return tasks if isinstance(tasks, dict) else {}


def _usable(entry: Any, kind: str | None, min_rows: int) -> bool:
    """A task's profile that can take part: same kind, enough rows, some labels counted."""
    return (
        isinstance(entry, dict)
        and (kind is None or entry.get("kind") == kind)
        and int(entry.get("rows") or 0) >= min_rows
        and sum((entry.get("labels") or {}).values()) > 0
    )


def _previous_confidence(refs: list[dict[str, Any]]) -> float | None:
    """The previous runs' mean confidence, weighted by their rows (runs without one left out)."""
    pairs = [(float(r["mean_confidence"]), int(r["rows"])) for r in refs if r.get("mean_confidence") is not None]
    weight = sum(n for _, n in pairs)
    return sum(c * n for c, n in pairs) / weight if weight else None


def _message(task: str, figure: float, prev_conf: float | None, cur_conf: float | None, cfg: DriftConfig) -> str:
    parts = []
    if figure >= cfg.psi_warn:
        parts.append(f"its label distribution shifted (PSI {figure:.3f} >= {cfg.psi_warn:g})")
    if prev_conf is not None and cur_conf is not None and prev_conf - cur_conf > cfg.confidence_drop:
        parts.append(
            f"its mean confidence fell from {prev_conf:.3f} to {cur_conf:.3f} (a drop over {cfg.confidence_drop:g})"
        )
    return (f"Task {task!r} drifted from the previous runs: " + " and ".join(parts) + ".") if parts else ""


def detect(profile: Mapping[str, Any], previous: list[Mapping[str, Any]], cfg: DriftConfig) -> list[dict[str, Any]]:
    """Warnings for the tasks of ``profile`` that drifted from the pooled last ``cfg.window`` of ``previous``
    (profiles, oldest first; entries without a profile are ignored): one dict per drifted task with ``task``,
    ``psi``, ``mean_confidence``, ``previous_mean_confidence`` and ``message``. A task with fewer than
    ``cfg.min_rows`` rows here, or with no previous run of enough rows, gets no verdict."""
    window = [p for p in previous if _tasks(p)][-cfg.window :] if cfg.window > 0 else []
    warnings = []
    for task, cur in _tasks(profile).items():
        if not _usable(cur, None, cfg.min_rows):
            continue
        refs = [_tasks(p)[task] for p in window if _usable(_tasks(p).get(task), cur.get("kind"), cfg.min_rows)]
        if not refs:
            continue
        pooled: Counter[str] = Counter()
        for r in refs:
            pooled.update({str(k): int(v) for k, v in r["labels"].items()})
        figure = psi({str(k): int(v) for k, v in cur["labels"].items()}, pooled)
        cur_conf = cur.get("mean_confidence")
        prev_conf = _previous_confidence(refs)
        message = _message(task, figure, prev_conf, cur_conf, cfg)
        if message:
            warnings.append(
                {
                    "task": task,
                    "psi": round(figure, 6),
                    "mean_confidence": cur_conf,
                    "previous_mean_confidence": prev_conf,
                    "message": message,
                }
            )
    return warnings
