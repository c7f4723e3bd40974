"""A run's health before its commit: the error budget and drift against earlier runs of the same model.

``assess`` fills the manifest's ``profile`` (label distributions and confidence of the committed rows,
``tag/profile.py``) and ``health`` (status ``ok`` | ``warning`` | ``failed``; ``drift.detect`` against the profiles
of up to ``DriftConfig.window`` earlier runs of the same model version). A run over its error budget
still commits: its status says ``failed`` and the CLI (exit 3) and the nightly flow (Failed) say why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from catalog_tagger.tag import delta

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from catalog_tagger.config import TaskConfig
    from catalog_tagger.schema import RunManifest
    from catalog_tagger.tag.config import TagJobConfig
    from catalog_tagger.tag.writer import StagedFile

log = logging.getLogger(__name__)

STATUS_OK, STATUS_WARNING, STATUS_FAILED = "ok", "warning", "failed"
EXIT_OVER_BUDGET = 3  # `catalog-tagger tag`: the run committed, but more of its images failed than its budget allows


def assess(
    manifest: RunManifest, cfg: TagJobConfig, *, table: DeltaTable, files: list[StagedFile], tasks: TaskConfig
) -> None:
    """Set ``manifest.profile`` and ``manifest.health`` from the files about to be committed."""
    from catalog_tagger.drift import DriftConfig, detect
    from catalog_tagger.tag.profile import profile_files

    drift_cfg = DriftConfig()
    profile: dict[str, Any] | None = None
    drift: list[dict[str, Any]] = []
    try:
        profile = profile_files(cfg.output, cfg.storage_options, [f.path for f in files], tasks)
        drift = detect(profile, previous_profiles(table, manifest.model_version, drift_cfg.window), drift_cfg)
    except Exception as err:  # noqa: BLE001 - the profile is a report on the rows: it never costs the run its commit
        log.warning("run %s: no profile or drift check (%s: %s)", manifest.run_id, type(err).__name__, err)
    manifest.profile = profile
    manifest.health = health_record(manifest.counts.error, manifest.counts.rows, cfg.max_error_fraction, drift)
    for line in manifest.health["warnings"]:
        log.warning("run %s: %s", manifest.run_id, line)


def previous_profiles(table: DeltaTable, model_version: str, window: int) -> list[Mapping[str, Any]]:
    """The profiles of the last ``window`` committed runs of ``model_version``, oldest first as ``drift.detect``
    takes them (runs whose manifest has no profile, as before manifest version 5, are skipped)."""
    found: list[Mapping[str, Any]] = []
    for run in reversed(delta.all_runs(table)):  # newest first, stopping at the window
        m = run.manifest
        if len(found) >= window:
            break
        if m.get("model_version") == model_version and isinstance(m.get("profile"), dict):
            found.append(m["profile"])
    return found[::-1]


def health_record(errors: int, rows: int, max_error_fraction: float, drift: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``health``: failed over the error budget, warning on drift, else ok."""
    fraction = errors / rows if rows else 0.0
    warnings = []
    over = fraction > max_error_fraction
    if over:
        warnings.append(budget_line(errors, rows, fraction, max_error_fraction))
    warnings += [str(d.get("message") or f"drift in task {d.get('task')}") for d in drift]
    status = STATUS_FAILED if over else STATUS_WARNING if drift else STATUS_OK
    return {
        "status": status,
        "error_fraction": round(fraction, 6),
        "max_error_fraction": max_error_fraction,
        "warnings": warnings,
        "drift": drift,
    }


def budget_line(errors: int, rows: int, fraction: float, max_error_fraction: float) -> str:
    """``12 of 200 images (6.0%) failed, over the 5.0% error budget``."""
    return f"{errors:,} of {rows:,} images ({fraction:.1%}) failed, over the {max_error_fraction:.1%} error budget"


def over_budget(manifest: dict[str, Any] | None) -> str | None:
    """Why a committed run is over its error budget (None when it is not, or its manifest has no health)."""
    health = (manifest or {}).get("health") or {}
    if health.get("status") != STATUS_FAILED:
        return None
    counts = (manifest or {}).get("counts") or {}
    rows, errors = int(counts.get("rows") or 0), int(counts.get("error") or 0)
    return budget_line(errors, rows, float(health.get("error_fraction") or 0.0), float(health["max_error_fraction"]))
