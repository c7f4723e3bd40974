"""Accelerator-hours: measured cost of the multi-head run vs calibrated cost of n single-task models."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from catalog_tagger.model.inference import autocast
from catalog_tagger.model.multihead import MultiHeadModel

log = logging.getLogger(__name__)

DEFAULT_PRICE_PER_HOUR = 2.50  # USD per accelerator-hour: roughly an on-demand cloud A10G/L4-class GPU in 2026
CALIBRATION_REPEATS = 7
CALIBRATION_WARMUP = 3
# What the Predictor spends on calibration at actor start: a small slice of the first batch, fewer repeats.
PREDICTOR_CALIBRATION_IMAGES = 16
PREDICTOR_CALIBRATION_REPEATS = 5
PREDICTOR_CALIBRATION_WARMUP = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, *, repeats: int, warmup: int
) -> list[list[float]]:
    """Seconds of each call of each of ``fns``: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Every round runs all of them in turn (f0, f1, ..., f0, f1, ...), so background load on a shared machine
    is spread over all alike instead of biasing whichever ran during a busy spell. The device is synchronised
    around each call, so asynchronous CUDA work counts where it was queued. Callers take the minimum or median.
    """
    for _ in range(warmup):  # oneDNN primitive creation, allocator, cudnn autotune
        for fn in fns:
            fn()
    seconds: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, seconds, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - t0)
    return seconds


def calibrate_single_task(
    model: MultiHeadModel,
    images: np.ndarray,
    repeats: int = CALIBRATION_REPEATS,
    warmup: int = CALIBRATION_WARMUP,
) -> dict[str, float]:
    """Time, on the same batch and device, the multi-head model vs a single-task model of the same architecture.

    A single-task model is the backbone plus one head (the first task's), with the same input preparation.
    Runs alternate so machine noise hits both alike; the ratio of the minima is returned.
    """
    device = model.mean.device
    x_np = torch.from_numpy(np.ascontiguousarray(images))
    first = next(iter(model.heads))

    def multi() -> None:
        with torch.inference_mode(), autocast(device):
            out = model(model.prepare(x_np))
            for v in out.logits.values():
                v.float().cpu()
            out.embedding.float().cpu()

    def single() -> None:
        with torch.inference_mode(), autocast(device):
            emb = model.forward_features(model.prepare(x_np))
            model.forward_head(emb, first).float().cpu()

    tm, ts = time_interleaved([multi, single], device, repeats=repeats, warmup=warmup)
    # The minimum is the least noisy estimate of a fixed amount of work on a shared machine.
    m, s = min(tm), min(ts)
    ratio = s / m if m > 0 else 1.0
    log.info("calibration on %s: multi-head %.4fs, single-task %.4fs per batch of %d", device, m, s, len(images))
    return {"multi_s": m, "single_s": s, "single_over_multi": ratio, "batch": float(len(images))}


def calibrate_baselines(
    model: MultiHeadModel,
    baselines: list[MultiHeadModel],
    images: np.ndarray,
    *,
    repeats: int = CALIBRATION_REPEATS,
    warmup: int = CALIBRATION_WARMUP,
) -> dict[str, float]:
    """Time the user's own single-task models against the multi-head model on the same batch and device.

    Returns ``single_over_multi`` = (sum of the baselines' times) / (multi-head time): what running all of them
    costs per unit of measured multi-head time. Minimum of interleaved repeats, as in ``calibrate_single_task``.
    """
    device = model.mean.device
    x = torch.from_numpy(np.ascontiguousarray(images))

    def forward(m: MultiHeadModel) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device):
                out = m(m.prepare(x))
                for v in out.logits.values():
                    v.float().cpu()

        return run

    times = time_interleaved([forward(m) for m in (model, *baselines)], device, repeats=repeats, warmup=warmup)
    best = [min(t) for t in times]
    ratio = sum(best[1:]) / best[0] if best[0] > 0 else float(len(baselines))
    log.info("baseline calibration on %s: multi-head %.4fs, %d single-task models %.4fs", device, best[0],
             len(baselines), sum(best[1:]))  # fmt: skip
    return {"multi_s": best[0], "single_s": sum(best[1:]), "single_over_multi": ratio, "batch": float(len(images))}


@dataclass
class Savings:
    """The savings report of one run (in the manifest, on the console, in the HTML report)."""

    images: int  # images the model ran on (ok rows)
    tasks: int
    device: str
    multi_head_accel_s: float  # measured busy time of the multi-head model
    single_task_accel_s: float  # what n single-task models would need (see ``method``)
    accel_hours_saved: float
    fraction_saved: float
    price_per_hour: float
    cost_saved: float
    decode_cpu_s: float  # measured CPU time of read + decode in this run
    decode_cpu_s_saved: float  # n pipelines decode n times: (n - 1) x decode_cpu_s
    method: str  # "calibrated" | "baseline-artifacts"

    @property
    def multi_head_accel_hours(self) -> float:
        return self.multi_head_accel_s / 3600.0

    @property
    def single_task_accel_hours(self) -> float:
        return self.single_task_accel_s / 3600.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["multi_head_accel_hours"] = self.multi_head_accel_hours
        d["single_task_accel_hours"] = self.single_task_accel_hours
        return d


def compute_savings(
    *,
    images: int,
    tasks: int,
    device: str,
    multi_s: float,
    single_s: float,
    decode_s: float,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
    method: str = "calibrated",
) -> Savings:
    saved_s = max(single_s - multi_s, 0.0) if single_s > 0 else 0.0
    return Savings(
        images=images,
        tasks=tasks,
        device=device,
        multi_head_accel_s=multi_s,
        single_task_accel_s=single_s,
        accel_hours_saved=saved_s / 3600.0,
        fraction_saved=(saved_s / single_s) if single_s > 0 else 0.0,
        price_per_hour=price_per_hour,
        cost_saved=saved_s / 3600.0 * price_per_hour,
        decode_cpu_s=decode_s,
        decode_cpu_s_saved=decode_s * max(tasks - 1, 0),
        method=method,
    )
