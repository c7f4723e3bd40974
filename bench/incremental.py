"""A full run on N images, then 1% new images and an incremental run: what the nightly run costs."""

from __future__ import annotations

import math

from bench.common import (
    MAIN,
    BenchResult,
    Context,
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


def run(ctx: Context) -> BenchResult:
    s = ctx.sizes
    n = s.incremental_images
    new = max(1, math.ceil(n * s.incremental_new_fraction))
    res = BenchResult(NAME, {"images": n, "new_images": new, "rounds": s.rounds, "catalog": MAIN.key})
    images = ensure_catalog(MAIN, n + new)
    model = ensure_artifact("multi4")
    pairs = []
    with scratch(NAME) as tmp:
        before = write_manifest(tmp / "before.parquet", images[:n])
        after = write_manifest(tmp / "after.parquet", images)
        for r in range(s.rounds):
            if not ctx.another_round(r, res.notes):
                break
            out = str(tmp / f"out-{r}")
            # The job's defaults (calibrate=True, full=False): what a nightly run pays.
            first = run_job(model, before, out, batch_size=s.batch_size, full=False)
            second = run_job(model, after, out, batch_size=s.batch_size, full=False)
            if second.processed != new:
                raise RuntimeError(f"incremental run tagged {second.processed} images, expected {new}")
            pairs.append({"full": first.to_dict(), "incremental": second.to_dict()})
            ctx.say(f"{NAME} round {r + 1}/{s.rounds}: full {first.wall_s:.1f}s, +{new} new {second.wall_s:.1f}s")
    res.data["pairs"] = pairs
    executors = {k: sorted({str((p[k].get("resources") or {}).get("executor")) for p in pairs}) for k in pairs[0]}
    res.notes.append(f"executor (default 'auto'): {executors}")
    wall = median([ratio(p["incremental"]["wall_s"], p["full"]["wall_s"]) for p in pairs])
    accel = median([ratio(p["incremental"]["accel_s"], p["full"]["accel_s"]) for p in pairs])
    # Two points of wall = fixed + per_image * images: where would the 5% target be met?
    full_w = median([p["full"]["wall_s"] for p in pairs])
    inc_w = median([p["incremental"]["wall_s"] for p in pairs])
    per_image = (full_w - inc_w) / (n - new) if n > new else math.nan
    fixed = inc_w - per_image * new
    frac = s.incremental_new_fraction
    break_even = fixed * (1 - COST_TARGET) / (per_image * (COST_TARGET - frac)) if per_image > 0 else math.nan
    res.data.update(fixed_s=fixed, per_image_s=per_image, catalog_size_for_target=break_even)
    res.checks += [
        info(f"full run, {n} images (wall)", full_w, "s"),
        info(f"incremental run, +{new} new (wall)", inc_w, "s"),
        at_most("incremental / full cost (wall)", wall, COST_TARGET),
        at_most("incremental / full cost (accel-s)", accel, COST_TARGET),
        info("fixed cost per job.run (from the two runs)", fixed, "s"),
        info("marginal cost per image", per_image * 1000 if per_image == per_image else None, "ms"),
        info("catalog size where wall meets 5% at 1% new", break_even, "images"),
    ]
    res.notes.append(
        "job defaults (calibrate=True, incremental); manifest source with size+mtime so the diff uses listing "
        "identity; 'fixed cost' is validate + list + diff + Ray Data start + actor/model load + calibration + commit"
    )
    return res
