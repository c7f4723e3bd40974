"""The single-task calibration: a bounded measurement, with an error bar, of what n single-task models would cost
next to the multi-head model on one device; stored beside the output and reused by every later run with the same
(model version, device, batch size, precision).

Why it looks like this (issue 14): timing 16 images in every run, minimum of 5 repeats, gave saved fractions above
their physical bound (77-79% with 4 tasks, bound 75%) and a different figure every run. Here:

- What is timed: the multi-head model M (prepare + backbone + every head, outputs to the host) and its shared part
  B (prepare + backbone), interleaved round after round, so machine noise hits both alike. A single-task model for
  task t is the shared part plus that head, so the n of them cost ``n*B + (M - B)``: the factor over the multi-head
  model is ``1 + (n - 1) * b`` with ``b = B / M``.
- The bound: the shared part is a part of the whole, so ``b <= 1`` and the factor never exceeds n (the saved
  fraction never exceeds ``1 - 1/n``); a measured ``b`` above 1 is timing noise and is clamped, with a note.
- The error bar: ``b`` is the median of the per-round paired ratios; its interval is the distribution-free 95%
  interval of that median (order statistics), widened to at least the interquartile range of the ratios (the
  spread of the repeats). Rounds continue until the interval is narrow enough, or the round or time budget ends.
- ``--baseline`` (the user's own single-task models): those models are timed interleaved with the multi-head
  model instead; their factor is the summed time over the multi-head time, not bounded (they are other models).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from catalog_tagger.model.multihead import MultiHeadModel

log = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"  # OUT/calibration/<key hash>.json
RECORD_VERSION = 1
MIN_ROUNDS = 9  # below this the interval of the median is the whole range of the ratios
MAX_ROUNDS = 60
WARMUP_ROUNDS = 2
BUDGET_S = 30.0  # a calibration stops adding rounds after this long (it is paid once per key)
TARGET_HALF_WIDTH = 0.03  # stop once the interval's half-width is this fraction of the median
Z95 = 1.96

METHOD_CALIBRATED = "calibrated"
METHOD_BASELINE = "baseline-artifacts"


@dataclass(frozen=True)
class CalibrationKey:
    """What a calibration depends on: a later run with the same key reuses it."""

    model_version: str
    device: str  # "cpu", or "cuda:<GPU name>"
    batch: int  # images per forward pass
    precision: str  # "fp32" on CPU; "bf16" / "fp16" (autocast) on CUDA
    baselines: tuple[str, ...] = ()  # model versions of the user's single-task artifacts (``--baseline``)

    def file_name(self) -> str:
        """The record's file name: a hash of the key (model versions and device names make long names)."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{digest[:20]}.json"


@dataclass(frozen=True)
class Interval:
    """A measured value and its interval (``low <= value <= high``)."""

    value: float
    low: float
    high: float

    def map(self, fn: Callable[[float], float]) -> Interval:
        """The interval of a monotonic function of the value (either direction)."""
        a, b = fn(self.low), fn(self.high)
        return Interval(fn(self.value), min(a, b), max(a, b))

    def clamp(self, lo: float, hi: float) -> Interval:
        def c(x: float) -> float:
            return min(max(x, lo), hi)

        return Interval(c(self.value), c(self.low), c(self.high))


@dataclass(frozen=True)
class Calibration:
    """A stored calibration: the factor (n single-task models' busy time / the multi-head model's) and its interval."""

    key: CalibrationKey
    method: str  # METHOD_CALIBRATED | METHOD_BASELINE
    tasks: int
    factor: Interval
    ratio: Interval  # calibrated: shared part / multi-head (b); baselines: the same as factor
    multi_s: float  # median seconds of one multi-head forward pass on the calibration batch
    rounds: int
    converged: bool  # the interval reached TARGET_HALF_WIDTH before the round or time budget ran out
    seconds: float  # what the calibration took
    threads: int  # torch threads (CPU) it ran with
    measured_at: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["key"]["baselines"] = list(self.key.baselines)  # as JSON reads it back
        d["record_version"] = RECORD_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            key=CalibrationKey(**{**d["key"], "baselines": tuple(d["key"].get("baselines", ()))}),
            method=d["method"],
            tasks=int(d["tasks"]),
            factor=Interval(**d["factor"]),
            ratio=Interval(**d["ratio"]),
            multi_s=float(d["multi_s"]),
            rounds=int(d["rounds"]),
            converged=bool(d["converged"]),
            seconds=float(d["seconds"]),
            threads=int(d["threads"]),
            measured_at=d["measured_at"],
            notes=list(d.get("notes", [])),
        )


# --------------------------------------------------------------------------------------------- statistics
def median_interval(samples: Sequence[float]) -> Interval:
    """The median of ``samples`` with its distribution-free 95% interval (order statistics: the k-th smallest and
    k-th largest, k = floor((n - 1.96 sqrt n) / 2)), widened to at least the interquartile range."""
    xs = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(xs)
    k = max(0, math.floor((n - Z95 * math.sqrt(n)) / 2) - 1)  # 0-based index of the k-th smallest
    q25, q75 = np.quantile(xs, [0.25, 0.75])
    return Interval(float(np.median(xs)), float(min(xs[k], q25)), float(max(xs[n - 1 - k], q75)))


def _converged(iv: Interval) -> bool:
    return iv.value > 0 and (iv.high - iv.low) / 2 <= TARGET_HALF_WIDTH * iv.value


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    done: Callable[[list[list[float]]], bool],
    warmup: int = WARMUP_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
) -> list[list[float]]:
    """Seconds of each call of each of ``fns``, round after round (f0, f1, ..., f0, f1, ...), until ``done(times)``
    or ``max_rounds``. Interleaving spreads background load over all alike; the device is synchronised around each
    call, so asynchronous CUDA work counts where it was queued."""
    for _ in range(warmup):  # oneDNN primitive creation, the allocator, cudnn autotune
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < max_rounds and not done(times):
        for fn, samples in zip(fns, times, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, *, repeats: int, warmup: int
) -> list[list[float]]:
    """``time_rounds`` for a fixed number of rounds (``train.compare`` times its models with it)."""
    return time_rounds(fns, device, done=lambda t: len(t[0]) >= repeats, warmup=warmup, max_rounds=repeats)


def _stopper(
    ratio_of: Callable[[list[list[float]]], list[float]], budget_s: float, min_rounds: int
) -> Callable[[list[list[float]]], bool]:
    """Stop once ``min_rounds`` ran and the median's interval is narrow enough, or the time budget is spent."""
    start = time.perf_counter()

    def done(times: list[list[float]]) -> bool:
        if len(times[0]) < min_rounds:
            return False
        return time.perf_counter() - start > budget_s or _converged(median_interval(ratio_of(times)))

    return done


def precision(device: torch.device) -> str:
    """The precision the tagging job's forward pass runs in on ``device`` (``model.inference.autocast``)."""
    import torch

    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:<GPU name>``: calibrations of different GPUs are different measurements."""
    import torch

    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def factor_of(measured: Interval, tasks: int, method: str) -> tuple[Interval, Interval, list[str]]:
    """(ratio, factor, notes) from the measured median ratio and its interval.

    Calibrated: the ratio is the shared part's share ``b`` of the multi-head time, clamped to [0, 1] (a part never
    costs more than the whole); the factor is ``1 + (n - 1) b``, so never above n. Baselines: the measured ratio
    is the factor (other models: no architectural bound).
    """
    if method == METHOD_BASELINE:
        return measured, measured, []
    notes = []
    if measured.high > 1.0:
        notes.append(
            f"the shared part timed at {measured.value:.3f} (up to {measured.high:.3f}) of the multi-head model; "
            "above 1 is timing noise (the backbone is a part of the model): clamped to the bound 1, where "
            f"{tasks} single-task models cost at most {tasks} times the multi-head model"
        )
    ratio = measured.clamp(0.0, 1.0)
    return ratio, ratio.map(lambda b: 1 + (tasks - 1) * b), notes


@dataclass(frozen=True)
class Budget:
    """How long a calibration may measure."""

    budget_s: float = BUDGET_S
    min_rounds: int = MIN_ROUNDS
    max_rounds: int = MAX_ROUNDS


def measure(
    model: MultiHeadModel,
    images: np.ndarray,
    key: CalibrationKey,
    *,
    baselines: Sequence[MultiHeadModel] = (),
    budget: Budget | None = None,
) -> Calibration:
    """Calibrate on ``images`` (one batch of the model's input) on the model's device; see the module docstring."""
    import torch

    from catalog_tagger.model.inference import autocast

    budget = budget or Budget()
    device = model.mean.device
    x = torch.from_numpy(np.ascontiguousarray(images))
    n = len(model.heads)

    def multi(m: MultiHeadModel) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device):
                out = m(m.prepare(x))
                for v in out.logits.values():
                    v.float().cpu()
                out.embedding.float().cpu()

        return run

    def shared() -> None:
        with torch.inference_mode(), autocast(device):
            model.forward_features(model.prepare(x)).float().cpu()

    if baselines:
        fns = [multi(model), *(multi(b) for b in baselines)]

        def ratios(t: list[list[float]]) -> list[float]:
            return [sum(r[1:]) / r[0] for r in zip(*t, strict=True)]
    else:
        fns = [multi(model), shared]

        def ratios(t: list[list[float]]) -> list[float]:
            return [s / m for m, s in zip(t[0], t[1], strict=True)]

    t0 = time.perf_counter()
    done = _stopper(ratios, budget.budget_s, budget.min_rounds)
    times = time_rounds(fns, device, done=done, max_rounds=budget.max_rounds)
    seconds = time.perf_counter() - t0
    measured = median_interval(ratios(times))
    method = METHOD_BASELINE if baselines else METHOD_CALIBRATED
    ratio, factor, notes = factor_of(measured, n, method)
    cal = Calibration(
        key=key,
        method=method,
        tasks=n,
        factor=factor,
        ratio=ratio,
        multi_s=float(np.median(times[0])),
        rounds=len(times[0]),
        converged=_converged(measured),
        seconds=seconds,
        threads=torch.get_num_threads(),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=notes,
    )
    log.info(
        "calibration on %s: factor %.3f (%.3f-%.3f) after %d rounds in %.1fs",
        key.device, factor.value, factor.low, factor.high, cal.rounds, seconds,
    )  # fmt: skip
    return cal
