"""The figures of a run as people read them: number formats in human units (ms, s, min, h; money with sensible
digits), the savings fields with their ranges, and the timings.

``SAVINGS_FIELDS`` and ``TIMING_FIELDS`` are the one list of those numbers (manifest key, label, format): the
console summary, the HTML report and the Prefect artifacts all show them through ``savings_rows`` and
``timing_rows``, so a resumed run shows the same numbers everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


# --------------------------------------------------------------------------------------------- number formats
def num(v: float | None, digits: int = 4) -> str:
    """A quantity readable at any scale: fixed ``digits`` decimals from 0.1 up, three significant digits below."""
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}" if v == 0 or abs(v) >= 0.1 else f"{v:.3g}"


def _significant(v: float, digits: int = 2) -> str:
    """``v`` rounded to ``digits`` significant digits, written out (never 5.9e-05)."""
    exponent = math.floor(math.log10(abs(v)))
    return f"{round(v, digits - 1 - exponent):.{max(0, digits - 1 - exponent)}f}"


def money(v: float | None) -> str:
    """US dollars: cents from one cent up; below a cent two significant digits, written out ($0.000059)."""
    if v is None:
        return "n/a"
    return f"${v:,.2f}" if v == 0 or abs(v) >= 0.01 else f"${_significant(v)}"


def duration(seconds: float | None) -> str:
    """A time span in the unit that reads best: ms, s, min or h."""
    if seconds is None:
        return "n/a"
    s = abs(seconds)
    if s == 0:
        return "0 s"
    if s < 1:
        return f"{seconds * 1000:.3g} ms"
    if s < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"


def hours(h: float | None) -> str:
    """Hours (the manifest's unit for money-relevant time) shown like ``duration``."""
    return duration(None if h is None else h * 3600.0)


def count(v: int | None) -> str:
    """A whole number with thousands separators."""
    return "n/a" if v is None else f"{v:,}"


def percent(v: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return "n/a" if v is None else f"{v:.1%}"


def times(v: float | None) -> str:
    """A ratio as ``3.89x``."""
    return "n/a" if v is None else f"{v:.2f}x"


def text(v: Any) -> str:
    """Any value as text."""
    return "n/a" if v is None else str(v)


def _cost(v: float | None) -> str:
    return "not priced" if v is None else money(v)


# --------------------------------------------------------------------------------------------- savings
_METHOD_NOTES = {
    "calibrated": "calibrated: the shared backbone timed against the whole model on this device; n single-task "
    "models cost 1 + (n-1) x its share",
    "baseline-artifacts": "timed: the user's own single-task models against the multi-head model on this device",
}
# What busy and allocated time are (said under every savings table).
VIEWS_NOTE = (
    "Busy time: the model's forward passes (synchronised on a GPU). Allocated time: devices x the predict stage's "
    "wall time, what a bill shows; each single-task run keeps this run's idle time. Ranges: the calibration's interval."
)


@dataclass(frozen=True)
class SavingsField:
    """One number of a run's savings (``accounting.compute_savings`` in the manifest) and how people see it."""

    key: str  # key in the manifest's ``savings``
    label: str  # may name {price} and {price_unit}, filled from the same savings
    show: Callable[[Any], str]  # raw manifest value -> shown text (the unit is in the label or the text)
    detail: bool = False  # raw detail: in the Prefect table artifact only, not on the console or the page
    ranged: bool = False  # the manifest also has ``<key>_low`` / ``<key>_high``: shown as "value (low-high)"


SAVINGS_FIELDS: tuple[SavingsField, ...] = (
    SavingsField("images", "images tagged (ok)", count),
    SavingsField("tasks", "tasks (heads)", count),
    SavingsField("device", "device", text),
    SavingsField("devices", "devices (one per predictor)", count),
    SavingsField("method", "single-task cost", lambda m: _METHOD_NOTES.get(m, f"{m}: not measured")),
    SavingsField("factor", "n single-task models cost, per multi-head cost", times, ranged=True),
    SavingsField("multi_head_accel_s", "busy time: multi-head model (measured)", duration),
    SavingsField("single_task_accel_s", "busy time: n single-task models", duration, ranged=True),
    SavingsField("accel_hours_saved", "busy time saved", hours, ranged=True),
    SavingsField("fraction_saved", "busy time saved, fraction", percent, ranged=True),
    SavingsField("allocated_accel_s", "allocated time: multi-head run (measured)", duration),
    SavingsField("single_task_allocated_s", "allocated time: n single-task runs", duration, ranged=True),
    SavingsField("allocated_hours_saved", "allocated time saved", hours, ranged=True),
    SavingsField("allocated_fraction_saved", "allocated time saved, fraction", percent, ranged=True),
    SavingsField("price_per_hour", "price per {price_unit}", _cost, detail=True),
    SavingsField("price_unit", "what the price is per", text, detail=True),
    SavingsField("cost_saved", "cost saved, busy ({price})", _cost, ranged=True),
    SavingsField("allocated_cost_saved", "cost saved, allocated ({price})", _cost, ranged=True),
    SavingsField("decode_cpu_s", "decode CPU time (measured)", duration, detail=True),
    SavingsField("decode_cpu_s_saved", "decode CPU time saved (n pipelines decode n times)", duration),
    SavingsField("decode_cost_saved", "decode cost saved (per CPU core-hour)", _cost),
)
# Keys of the manifest's savings that are not numbers to show: the calibration record and the notes.
SAVINGS_RECORDS = ("calibration", "notes")


def savings_keys() -> list[str]:
    """Every numeric key of the manifest's savings, ranges included, in display order."""
    return [k for f in SAVINGS_FIELDS for k in ((f.key, f"{f.key}_low", f"{f.key}_high") if f.ranged else (f.key,))]


def _shown(f: SavingsField, savings: dict[str, Any]) -> str:
    """The field's text; a ranged field with a range adds it: ``75.0% (72.1%-75.0%)``."""
    value = savings[f.key]
    shown = f.show(value)
    low, high = savings.get(f"{f.key}_low"), savings.get(f"{f.key}_high")
    if f.ranged and value is not None and low is not None and high is not None and f.show(low) != f.show(high):
        shown += f" ({f.show(low)}\u2013{f.show(high)})"
    return shown


def savings_rows(savings: dict[str, Any], *, details: bool = False) -> list[tuple[str, str, str, Any]]:
    """(manifest key, label, shown text, raw value) per savings field present; ``details`` adds the raw details."""
    price = savings.get("price_per_hour")
    names = {
        "price": "not priced" if price is None else f"at {money(price)} per {savings.get('price_unit')}",
        "price_unit": savings.get("price_unit") or "hour",
    }
    return [
        (f.key, f.label.format(**names), _shown(f, savings), savings[f.key])
        for f in SAVINGS_FIELDS
        if f.key in savings and (details or not f.detail)
    ]


def savings_notes(manifest: dict[str, Any] | None) -> list[str]:
    """The savings' notes (bounds applied, resumed runs) and the calibration line, for every place that shows them."""
    savings = (manifest or {}).get("savings") or {}
    line = calibration_line(savings)
    return [*(savings.get("notes") or []), *([line] if line else [])]


def calibration_line(savings: dict[str, Any]) -> str | None:
    """How the run's single-task figures were calibrated, in one sentence (None without a calibration)."""
    cal = savings.get("calibration")
    if not cal:
        return None
    how = "reused the stored calibration" if cal.get("reused") else f"calibrated now ({duration(cal.get('seconds'))})"
    bar = "" if cal.get("converged") else "; the interval did not narrow to 3% within its time budget"
    return (
        f"{how}: measured {cal.get('measured_at')} on {cal['key']['device']}, batch {cal['key']['batch']}, "
        f"{cal['key']['precision']}, {cal.get('rounds')} interleaved rounds{bar}"
    )


# --------------------------------------------------------------------------------------------- timings
TIMING_FIELDS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("images_per_s", "throughput, images/s (tagged ok by this attempt / pipeline time)", lambda v: num(v, 1)),
    ("wall_s", "wall time (listing, start-up and commit included)", duration),
    ("pipeline_s", "pipeline time (read, decode, predict, write)", duration),
    ("ray_init_s", "start-up: starting or joining Ray", duration),
    ("calibration_s", "start-up: calibration (read, or measured once)", duration),
    ("first_batch_s", "start-up: pipeline start to first batch", duration),
)


def timing_rows(timings: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """(key, label, shown, raw) of a run's timings: the console, the page and the Prefect summary all show these."""
    return [(key, label, show(timings.get(key)), timings.get(key)) for key, label, show in TIMING_FIELDS]
