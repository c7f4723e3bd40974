"""``compare``'s estimate of what a full re-tag with model B would cost, from an output's recorded runs or, without
one, per million images; the estimate says in words how it was made.

The recorded figures are the runs' own (``accounting.py``): busy seconds of the model's forward passes and the ok
images they covered (``savings.multi_head_accel_s`` / ``savings.images``), allocated seconds (devices x the
predict stage's wall time) and the price per device-hour. B's seconds per image on the output's device:

- **recorded**: the output's latest model is B: its own recorded busy time per image.
- **scaled**: the output's latest model is A: A's recorded busy time per image x B/A, the ratio measured here with
  both models timed interleaved on the same batch (``compare_run.time_both``), with its interval. A ratio moves
  between devices far better than a time does; it is still this machine's ratio, which the text says.
- **measured here**: the output's model is neither: B's busy time per image measured on this machine (this
  device, these threads), which may be another device than the output's; the text says both.

Allocated time keeps the recorded idle time per image (read, decode, write, start-up do not change with the
model) and adds B's busy time. A full re-tag covers every image of ``latest`` (ok rows), at the recorded price when
there is one, else ``--price-per-hour``, else the default GPU price on a GPU (a CPU run is not priced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catalog_tagger.accounting import DEFAULT_PRICE_PER_HOUR
from catalog_tagger.calibration import Interval
from catalog_tagger.errors import UserError
from catalog_tagger.figures import duration, money
from catalog_tagger.storage import redact

PER_IMAGES = 1_000_000  # the unit of the estimate without an output
RECORDED, SCALED, MEASURED_HERE, NOT_MEASURED = "recorded", "scaled", "measured here", "not measured"


@dataclass(frozen=True)
class Recorded:
    """What an output's committed runs say about tagging it."""

    output: str
    images: int  # ok images in ``latest``: what a full re-tag covers
    model_version: str | None  # the latest run's model
    runs: int  # that model's runs with a savings record
    busy_s_per_image: float | None  # summed busy seconds / summed ok images of those runs
    allocated_s_per_image: float | None  # the same for allocated seconds (runs that recorded them)
    device: str | None  # the latest such run's device ("cpu" | "cuda")
    price_per_hour: float | None  # its price per device-hour (None: not priced)
    price_unit: str | None


def recorded_from(output: str, manifests: list[dict[str, Any]], images: int) -> Recorded:
    """The figures of the latest run's model, over all its runs that recorded savings (more images, less noise)."""
    if not manifests:
        raise UserError(f"{redact(output)}: no committed runs to estimate from (leave out --output for the per-1M "
                        "images estimate)")  # fmt: skip
    version = manifests[-1].get("model_version")
    mine = [m.get("savings") or {} for m in manifests if m.get("model_version") == version]
    runs = [s for s in mine if s.get("images")]
    tagged = sum(int(s["images"]) for s in runs)
    busy = [s["multi_head_accel_s"] for s in runs if s.get("multi_head_accel_s") is not None]
    timed = [s for s in runs if s.get("allocated_accel_s") is not None]
    alloc_images = sum(int(s["images"]) for s in timed)
    last = runs[-1] if runs else {}
    return Recorded(
        output=redact(output),
        images=images,
        model_version=version,
        runs=len(runs),
        busy_s_per_image=sum(busy) / tagged if busy and tagged else None,
        allocated_s_per_image=sum(s["allocated_accel_s"] for s in timed) / alloc_images if alloc_images else None,
        device=last.get("device"),
        price_per_hour=last.get("price_per_hour"),
        price_unit=last.get("price_unit"),
    )


def read_recorded(output: str, storage_options: dict[str, Any] | None = None) -> Recorded:
    """``recorded_from`` an output root: its committed runs' manifests and the ok images of ``latest``."""
    from catalog_tagger.query import open_catalog

    cat = open_catalog(output, storage_options)
    try:
        row = cat.con.execute("SELECT count(*) FROM latest").fetchone()
    finally:
        cat.con.close()
    return recorded_from(output, cat.manifests, int(row[0]) if row else 0)


def _put(out: dict[str, Any], key: str, iv: Interval | None) -> None:
    out[key] = None if iv is None else iv.value
    out[f"{key}_low"] = None if iv is None else iv.low
    out[f"{key}_high"] = None if iv is None else iv.high


def _b_per_image(
    rec: Recorded | None, timing: dict[str, Any] | None, version_a: str, version_b: str
) -> tuple[str, Interval | None, str]:
    """(method, B's busy seconds per image, how) on the output's device, or on this machine without an output."""
    here = None if timing is None else Interval(timing["b_s_per_image"], timing["b_s_per_image_low"],
                                                timing["b_s_per_image_high"])  # fmt: skip
    where = "" if timing is None else f"{timing['device']}, {timing['threads']} thread(s), batch {timing['batch']}"
    if rec is not None and rec.busy_s_per_image is not None and rec.model_version == version_b:
        per = rec.busy_s_per_image
        how = f"the output was tagged with B: its recorded busy time, {duration(per)} per image over {rec.runs} run(s)"
        return RECORDED, Interval(per, per, per), how
    if rec is not None and rec.busy_s_per_image is not None and rec.model_version == version_a and timing:
        ratio = Interval(timing["ratio"], timing["ratio_low"], timing["ratio_high"])
        per = rec.busy_s_per_image
        how = (f"the output was tagged with A: A's recorded busy time ({duration(per)} per image over {rec.runs} "
               f"run(s), on {rec.device}) x B/A = {ratio.value:.3f} ({ratio.low:.3f}-{ratio.high:.3f}), the ratio "
               f"of both models timed interleaved here ({where})")  # fmt: skip
        return SCALED, ratio.map(lambda r: r * per), how
    if here is None:
        return NOT_MEASURED, None, "no image of the sample decoded: B was not timed"
    if rec is None:
        return MEASURED_HERE, here, f"B's busy time per image measured here ({where})"
    other = "neither A nor B" if rec.model_version else "unknown"
    how = (f"the output's model ({rec.model_version}) is {other}: B's busy time per image measured here ({where}); "
           f"the output's runs were on {rec.device}, which may be another device")  # fmt: skip
    return MEASURED_HERE, here, how


def _price(rec: Recorded | None, timing: dict[str, Any] | None, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "device-hour (--price-per-hour)"
    if rec is not None and rec.price_per_hour is not None:
        return rec.price_per_hour, f"{rec.price_unit or 'device-hour'} (recorded)"
    device = rec.device if rec is not None else (timing or {}).get("device", "")
    if str(device).startswith("cuda"):
        return DEFAULT_PRICE_PER_HOUR, "GPU-hour (default price)"
    return None, "not priced (a CPU run: give --price-per-hour)"


def estimate(
    rec: Recorded | None,
    timing: dict[str, Any] | None,
    *,
    version_a: str,
    version_b: str,
    price_per_hour: float | None = None,
) -> dict[str, Any]:
    """The cost of re-tagging ``rec``'s images (or ``PER_IMAGES`` without an output) with B; see the docstring."""
    images = rec.images if rec is not None else PER_IMAGES
    method, per, how = _b_per_image(rec, timing, version_a, version_b)
    price, unit = _price(rec, timing, price_per_hour)
    out: dict[str, Any] = {
        "basis": "output" if rec is not None else f"per {PER_IMAGES:,} images",
        "output": None if rec is None else rec.output,
        "output_model_version": None if rec is None else rec.model_version,
        "images": images,
        "method": method,
        "how": how,
        "price_per_hour": price,
        "price_unit": unit,
    }
    _put(out, "b_busy_s_per_image", per)
    busy = None if per is None else per.map(lambda s: s * images)
    _put(out, "busy_s", busy)
    idle = None
    if rec is not None and rec.allocated_s_per_image is not None and rec.busy_s_per_image is not None:
        idle = max(rec.allocated_s_per_image - rec.busy_s_per_image, 0.0)
    alloc = None if busy is None or idle is None else busy.map(lambda s: s + idle * images)
    _put(out, "allocated_s", alloc)
    _put(out, "cost", None if busy is None or price is None else busy.map(lambda s: s / 3600 * price))
    _put(out, "allocated_cost", None if alloc is None or price is None else alloc.map(lambda s: s / 3600 * price))
    return out


def cost_lines(est: dict[str, Any]) -> list[str]:
    """The estimate in a few sentences (the terminal and the page show these)."""
    what = f"the output's {est['images']:,} images" if est["basis"] == "output" else est["basis"]
    lines = [f"Estimated cost of a full re-tag with B ({what})."]
    if est["busy_s"] is None:
        return [*lines, f"Not estimated: {est['how']}."]
    span = f"{duration(est['busy_s_low'])}-{duration(est['busy_s_high'])}"
    lines.append(f"Busy time: {duration(est['busy_s'])} ({span}); method: {est['method']}: {est['how']}.")
    if est["allocated_s"] is not None:
        lines.append(f"Allocated time (the recorded idle time per image kept): {duration(est['allocated_s'])}.")
    if est["cost"] is None:
        lines.append(f"Cost: {est['price_unit']}.")
    else:
        per = f"{money(est['price_per_hour'])} per {est['price_unit']}"
        cost = f"Cost, busy: {money(est['cost'])} ({money(est['cost_low'])}-{money(est['cost_high'])}) at {per}"
        if est["allocated_cost"] is not None:
            cost += f"; allocated: {money(est['allocated_cost'])}"
        lines.append(cost + ".")
    return lines
