"""Savings made from given numbers (no timing): a calibration, a run's usage, and the manifest's savings dict."""

from __future__ import annotations

from typing import Any

from catalog_tagger.accounting import Pricing, Usage, compute_savings
from catalog_tagger.calibration import METHOD_CALIBRATED, Calibration, CalibrationKey, Interval

KEY = CalibrationKey(model_version="v", device="cpu", batch=16, precision="fp32")


def calibration(value: float, low: float, high: float, tasks: int = 3) -> Calibration:
    """A calibrated factor ``value`` in [``low``, ``high``] for ``tasks`` heads."""
    return Calibration(key=KEY, method=METHOD_CALIBRATED, tasks=tasks, factor=Interval(value, low, high),
                       ratio=Interval(1, 1, 1), multi_s=0.1, rounds=9, converged=True, seconds=1.0, threads=1,
                       measured_at="2026-11-29T00:00:00+00:00")  # fmt: skip


def usage(**kw: Any) -> Usage:
    """A CPU run of 1,000 images on 3 tasks: 360 busy seconds of 500 allocated; ``kw`` overrides."""
    base = dict(images=1000, tasks=3, device="cpu", devices=1, cores_per_device=2, busy_s=360.0, allocated_s=500.0,
                decode_cpu_s=36.0)  # fmt: skip
    return Usage(**{**base, **kw})


def savings(tasks: int = 4, pricing: Pricing | None = None) -> dict[str, Any]:
    """The manifest's savings of a small calibrated run with ``tasks`` heads."""
    cal = calibration(3.0, 2.8, 3.2, tasks=tasks)
    return compute_savings(usage(tasks=tasks, images=20, busy_s=1.0, allocated_s=2.0), cal, pricing or Pricing())
