"""The savings report: what one multi-head model used against what n single-task models would have, in two views.

- **Busy** time: seconds the model's forward passes took (synchronised on a GPU), summed over the run's batches:
  what the model used. The n single-task models' busy time is that times the calibration's factor
  (``calibration.py``: measured once per model, device, batch size and precision, with its interval).
- **Allocated** time: devices x the wall time of the predict stage: what the bill shows. Each of the n single-task
  pipelines would keep this run's idle time (decode, I/O, start-up) and add its own busy time.

Every counterfactual figure carries the interval that the calibration's interval gives it (``_low``/``_high``).
Money: GPU runs at a price per GPU-hour; CPU runs at a price per CPU core-hour when one is given, else "not priced"
(never at a GPU rate). Decoding is CPU work either way: n pipelines would decode every image n times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from catalog_tagger.calibration import Calibration, Interval

DEFAULT_PRICE_PER_HOUR = 2.50  # USD per GPU-hour: roughly an on-demand cloud A10G/L4-class GPU in 2026
METHOD_NONE = "none"  # calibrate=False: no single-task figures


@dataclass(frozen=True)
class Pricing:
    """What an hour costs: GPUs per device-hour, CPUs per core-hour (None: CPU runs are not priced)."""

    gpu_per_hour: float = DEFAULT_PRICE_PER_HOUR
    cpu_core_per_hour: float | None = None


@dataclass(frozen=True)
class Usage:
    """What the run measurably used."""

    images: int  # images the model ran on (ok rows)
    tasks: int
    device: str  # "cpu" | "cuda"
    devices: int  # predictors (one device each): what the predict stage held
    cores_per_device: int  # CPU cores one predictor's forward pass uses (its torch threads); 1 on a GPU
    busy_s: float  # summed forward-pass seconds (every attempt's batches)
    allocated_s: float | None  # devices x the predict stage's wall time (this attempt; None: not known)
    decode_cpu_s: float  # summed CPU seconds of read + decode


def _put(out: dict[str, Any], key: str, iv: Interval | None) -> None:
    """``key``, ``key_low`` and ``key_high`` from ``iv`` (all None without it)."""
    out[key] = None if iv is None else iv.value
    out[f"{key}_low"] = None if iv is None else iv.low
    out[f"{key}_high"] = None if iv is None else iv.high


@dataclass(frozen=True)
class _View:
    """One view of the cost: what the multi-head run used and what the n single-task runs would (with range)."""

    used_s: float
    single_s: Interval
    saved_h: Interval
    fraction: Interval


def _view(used_s: float, idle_s: float, busy_s: float, tasks: int, factor: Interval) -> _View:
    """n single-task runs: each keeps ``idle_s`` (0 in the busy view) and adds its busy share (``busy_s x factor``
    in all)."""
    single = factor.map(lambda f: tasks * idle_s + busy_s * f)
    return _View(
        used_s=used_s,
        single_s=single,
        saved_h=single.map(lambda s: max(s - used_s, 0.0) / 3600.0),
        fraction=single.map(lambda s: max(1.0 - used_s / s, 0.0) if s > 0 else 0.0),
    )


def _price(usage: Usage, pricing: Pricing) -> tuple[float | None, str | None]:
    """(USD per device-hour, what that is) for the run's device; (None, None) for an unpriced CPU run."""
    if usage.device == "cuda":
        return pricing.gpu_per_hour, "GPU-hour"
    if pricing.cpu_core_per_hour is None:
        return None, None
    return pricing.cpu_core_per_hour * usage.cores_per_device, f"{usage.cores_per_device} CPU core-hour(s)"


def _times(iv: Interval, price: float) -> Interval:
    return iv.map(lambda h: h * price)


def compute_savings(
    usage: Usage, calibration: Calibration | None, pricing: Pricing, *, notes: list[str] | None = None
) -> dict[str, Any]:
    """The run's savings, as the manifest carries them under ``savings`` (flat keys; ranges as ``_low``/``_high``)."""
    factor = None if calibration is None else calibration.factor
    out: dict[str, Any] = {
        "images": usage.images,
        "tasks": usage.tasks,
        "device": usage.device,
        "devices": usage.devices,
        "method": METHOD_NONE if calibration is None else calibration.method,
    }
    _put(out, "factor", factor)
    busy = None if factor is None else _view(usage.busy_s, 0.0, usage.busy_s, usage.tasks, factor)
    alloc = None
    if factor is not None and usage.allocated_s is not None:
        idle = max(usage.allocated_s - usage.busy_s, 0.0)
        alloc = _view(usage.allocated_s, idle, usage.busy_s, usage.tasks, factor)
    out["multi_head_accel_s"] = usage.busy_s
    _put(out, "single_task_accel_s", None if busy is None else busy.single_s)
    _put(out, "accel_hours_saved", None if busy is None else busy.saved_h)
    _put(out, "fraction_saved", None if busy is None else busy.fraction)
    out["allocated_accel_s"] = usage.allocated_s
    _put(out, "single_task_allocated_s", None if alloc is None else alloc.single_s)
    _put(out, "allocated_hours_saved", None if alloc is None else alloc.saved_h)
    _put(out, "allocated_fraction_saved", None if alloc is None else alloc.fraction)
    price, unit = _price(usage, pricing)
    out["price_per_hour"], out["price_unit"] = price, unit
    for key, view in (("cost_saved", busy), ("allocated_cost_saved", alloc)):
        _put(out, key, None if view is None or price is None else _times(view.saved_h, price))
    out["decode_cpu_s"] = usage.decode_cpu_s
    out["decode_cpu_s_saved"] = usage.decode_cpu_s * max(usage.tasks - 1, 0)
    cpu = pricing.cpu_core_per_hour
    out["decode_cost_saved"] = None if cpu is None else out["decode_cpu_s_saved"] / 3600.0 * cpu
    out["notes"] = [*(calibration.notes if calibration else []), *(notes or [])]
    return out
