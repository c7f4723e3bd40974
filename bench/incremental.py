"""A full run on N images, then 1% new images and an incremental run: what the nightly run costs, and where the
incremental run's fixed cost goes (each phase timed around the library function that does it)."""

from __future__ import annotations

import functools
import importlib
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    MAIN,
    BenchResult,
    CatalogImage,
    Check,
    Context,
    JobRun,
    at_most,
    ensure_artifact,
    ensure_catalog,
    info,
    median,
    ratio,
    run_job,
    scratch,
    write_manifest,
)

NAME = "incremental"
COST_TARGET = 0.05
# The phases of job.run timed in the incremental run: (module, attribute, label). Top-level ones partition the
# run (with "the rest"); nested ones are shown as parts of them. A target the library no longer has is skipped.
TOP_PHASES = (
    ("catalog_tagger.tag.job", "validate", "validate (model weights, source, output probe)"),
    ("catalog_tagger.tag.job", "plan_run", "plan: list + DuckDB diff + work files"),
    ("catalog_tagger.tag.job", "execute", "execute: model load + decode + predict + write"),
    ("catalog_tagger.tag.job", "_commit", "commit: lock + dedup + Delta commit + latest MERGE + cleanup"),
)
SUB_PHASES = (
    ("catalog_tagger.tag.predictor", "Predictor.__init__", "  of execute: model load (Predictor)"),
    ("catalog_tagger.tag.job", "drop_duplicates", "  of commit: dedup"),
    ("catalog_tagger.tag.delta", "commit_run", "  of commit: Delta commit"),
    ("catalog_tagger.tag.latest", "merge_run", "  of commit: latest MERGE"),
)
REST = "the rest: layout check, open tables, latest catch-up, find_run, schema"


def _stored_calibration() -> bool:
    """Whether the job stores its calibration and reuses it in later runs of the same model (``--recalibrate``
    exists then): both runs can use the job's defaults."""
    from catalog_tagger.tag.config import TagJobConfig

    return "recalibrate" in TagJobConfig.model_fields


def _calibrate_once(model: str, image: CatalogImage, folder: Path, batch_size: int) -> tuple[Path, float | None]:
    """A one-image job (job defaults) that measures and stores the model's calibration: its record, copied into each
    round's output, is what a nightly full or incremental run of a calibrated model reuses. Returns the records'
    folder and the seconds the calibration took."""
    from catalog_tagger.calibration import CALIBRATION_DIR

    source = write_manifest(folder / "calibrate.parquet", [image])
    job = run_job(model, source, str(folder / "calibrate-out"), batch_size=batch_size, full=False)
    seconds = ((job.manifest or {}).get("timings") or {}).get("calibration_s")
    return folder / "calibrate-out" / CALIBRATION_DIR, seconds


def _reused(job: JobRun) -> bool | None:
    """Whether a run reused a stored calibration (None: it had none, or its manifest does not say)."""
    record = ((job.manifest or {}).get("savings") or {}).get("calibration")
    return None if not isinstance(record, dict) else bool(record.get("reused"))


@contextmanager
def phase_timer(targets: tuple[tuple[str, str, str], ...]) -> Iterator[dict[str, float]]:
    """Wrap each target (a function, or ``Class.method``) to add its wall seconds to the yielded dict by label."""
    seconds: dict[str, float] = {}
    restore: list[tuple[Any, str, Any]] = []

    def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t0

        return wrapper

    for module, attr, label in targets:
        owner: Any = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        fn = getattr(owner, name, None)
        if fn is None:
            continue
        restore.append((owner, name, fn))
        setattr(owner, name, timed(fn, label))
    try:
        yield seconds
    finally:
        for owner, name, fn in reversed(restore):
            setattr(owner, name, fn)


def run(ctx: Context) -> BenchResult:
    s = ctx.sizes
    n = s.incremental_images
    new = max(1, math.ceil(n * s.incremental_new_fraction))
    res = BenchResult(NAME, {"images": n, "new_images": new, "rounds": s.rounds, "catalog": MAIN.key})
    images = ensure_catalog(MAIN, n + new + 1)  # the last one only feeds the calibration job
    model = ensure_artifact("multi4")
    stored = _stored_calibration()
    # Until the calibration is stored and reused, calibrate=False stands in for the second run's reuse of it.
    incremental_kw: dict[str, Any] = {} if stored else {"calibrate": False}
    pairs, phases, reused = [], [], []
    with scratch(NAME) as tmp:
        records, calibration_s = _calibrate_once(model, images[n + new], tmp, s.batch_size) if stored else (None, None)
        before = write_manifest(tmp / "before.parquet", images[:n])
        after = write_manifest(tmp / "after.parquet", images[: n + new])
        for r in range(s.rounds):
            if not ctx.another_round(r, res.notes):
                break
            out = tmp / f"out-{r}"
            if records is not None:  # this model is calibrated already: both runs reuse the stored record
                shutil.copytree(records, out / records.name)
            # The full run: the job's defaults (full=False); calibrate=True measures here when nothing is stored.
            first = run_job(model, before, str(out), batch_size=s.batch_size, full=False)
            with phase_timer(TOP_PHASES + SUB_PHASES) as seconds:
                second = run_job(model, after, str(out), batch_size=s.batch_size, full=False, **incremental_kw)
            if second.processed != new:
                raise RuntimeError(f"incremental run tagged {second.processed} images, expected {new}")
            top = sum(seconds.get(label, 0.0) for _, _, label in TOP_PHASES)
            phases.append({**seconds, REST: second.wall_s - top})
            pairs.append({"full": first.to_dict(), "incremental": second.to_dict()})
            reused.append((_reused(first), _reused(second)))
            ctx.say(f"{NAME} round {r + 1}/{s.rounds}: full {first.wall_s:.1f}s, +{new} new {second.wall_s:.2f}s")
    res.data.update(pairs=pairs, phases_s=phases, incremental_kwargs=incremental_kw, calibration_s=calibration_s)
    executors = {k: sorted({str((p[k].get("resources") or {}).get("executor")) for p in pairs}) for k in pairs[0]}
    res.notes.append(f"executor (default 'auto'): {executors}; calibration reused (full, incremental): {reused}")
    res.checks += _checks(res, pairs, phases, n, new, s.incremental_new_fraction)
    if stored:
        res.checks.append(
            info("one-off calibration of the model (stored, reused by every later run)", calibration_s, "s")
        )
    calibration = (
        "both runs use the job's defaults and reuse the calibration a one-image job stored first (its record copied "
        "into each round's output)"
        if stored
        else "calibrate=False in the incremental run stands in for reusing a stored calibration (not in this job "
        "yet); the full run keeps the default calibrate=True"
    )
    res.notes.append(
        f"{calibration}; manifest source with size+mtime so the diff uses listing identity; phases: inclusive wall "
        "of each library call in the incremental run, median over rounds"
    )
    return res


def _checks(
    res: BenchResult, pairs: list[dict[str, Any]], phases: list[dict[str, float]], n: int, new: int, frac: float
) -> list[Check]:
    """The ratio next to its target, the two walls, the fixed/marginal split, and the fixed cost by phase."""
    wall = median([ratio(p["incremental"]["wall_s"], p["full"]["wall_s"]) for p in pairs])
    accel = median([ratio(p["incremental"]["accel_s"], p["full"]["accel_s"]) for p in pairs])
    # Two points of wall = fixed + per_image * images: where would the 5% target be met?
    full_w = median([p["full"]["wall_s"] for p in pairs])
    inc_w = median([p["incremental"]["wall_s"] for p in pairs])
    per_image = (full_w - inc_w) / (n - new) if n > new else math.nan
    fixed = inc_w - per_image * new
    break_even = fixed * (1 - COST_TARGET) / (per_image * (COST_TARGET - frac)) if per_image > 0 else math.nan
    res.data.update(fixed_s=fixed, per_image_s=per_image, catalog_size_for_target=break_even)
    checks = [
        info(f"full run, {n} images (wall)", full_w, "s"),
        info(f"incremental run, +{new} new (wall)", inc_w, "s"),
        at_most(f"incremental / full cost at {n} images (wall)", wall, COST_TARGET),
        at_most("incremental / full cost (accel-s)", accel, COST_TARGET),
        info("fixed cost per job.run (from the two runs)", fixed, "s"),
        info("marginal cost per image", per_image * 1000 if per_image == per_image else None, "ms"),
        info(f"catalog size where wall meets {COST_TARGET:.0%} at {frac:.0%} new", break_even, "images"),
    ]
    for label in [lb for _, _, lb in TOP_PHASES + SUB_PHASES] + [REST]:
        values = [p[label] for p in phases if label in p]
        if values:
            checks.append(info(f"incremental phase: {label}", median(values) * 1000, "ms"))
    return checks
