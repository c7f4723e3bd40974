"""The run's calibration: reuse the one stored beside the output for this (model version, device, batch size,
precision), or measure it once where the Predictors run (in this process, or as a Ray task with an actor's
resources) and store it. ``catalog_tagger.calibration`` is the measurement itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from catalog_tagger.calibration import CALIBRATION_DIR, Budget, Calibration, CalibrationKey, measure
from catalog_tagger.storage import join, redact
from catalog_tagger.tag.commit import read_json, write_json
from catalog_tagger.tag.config import TagJobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunCalibration:
    """The calibration a run's savings use, and what getting it cost this run."""

    calibration: Calibration
    reused: bool  # read from the output's store (not measured by this run)
    uri: str  # where it is stored
    seconds: float  # what this run spent on it (reading, or measuring)

    def record(self) -> dict[str, Any]:
        """What the manifest carries under ``savings.calibration``."""
        return {**self.calibration.to_dict(), "reused": self.reused, "uri": redact(self.uri)}


def record_uri(output: str, key: CalibrationKey) -> str:
    return join(output, CALIBRATION_DIR, key.file_name())


def load(output: str, storage_options: dict[str, Any] | None, key: CalibrationKey) -> Calibration | None:
    """The stored calibration of ``key``, or None (also for a record of another format: it is measured again)."""
    data = read_json(record_uri(output, key), storage_options)
    if data is None:
        return None
    try:
        cal = Calibration.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        log.warning("ignoring an unreadable calibration record %s: %s", redact(record_uri(output, key)), err)
        return None
    return cal if cal.key == key else None


def run_key(
    cfg: TagJobConfig, model_version: str, resources: dict[str, Any], baselines: tuple[str, ...]
) -> CalibrationKey:
    """The key of this run's calibration: the device the Predictors get (from the executor's plan)."""
    gpu = bool(resources.get("num_gpus"))
    return CalibrationKey(
        model_version=model_version,
        device=f"cuda:{_gpu_name(resources)}" if gpu else "cpu",
        batch=cfg.batch_size,
        # autocast picks bf16 where the GPU has it, else fp16: fixed per GPU model, which the device names
        precision="amp" if gpu else "fp32",
        baselines=baselines,
    )


def _gpu_name(resources: dict[str, Any]) -> str:
    """The GPU model the Predictors get: Ray's ``accelerator_type:<name>`` resources on a cluster (the driver may
    have no GPU), torch's device name in-process."""
    if resources.get("executor") == "ray":
        import ray

        names = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))  # type: ignore[no-untyped-call]
        return "+".join(names) or "unknown"
    import torch

    return str(torch.cuda.get_device_name())


def measure_in_place(
    model_uri: str, baselines: list[str], key: CalibrationKey, *, threads: int | None, budget: Budget | None = None
) -> dict[str, Any]:
    """Load the model (and baselines) on this process's device and calibrate on a batch of the run's size.

    Random pixels: the forward pass of these networks does the same work whatever the pixel values.
    Runs in the driver (local executor) or as a Ray task with an actor's resources; returns the record as a dict.
    """
    import torch

    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.model.inference import prepare_for_inference, select_device

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        device = select_device("cuda" if key.device.startswith("cuda") else "cpu")
        model, card = load_artifact(model_uri, map_location="cpu")
        model = prepare_for_inference(model, device)
        others = [prepare_for_inference(load_artifact(u, map_location="cpu")[0], device) for u in baselines]
        size = card.image_size
        images = np.random.default_rng(0).integers(0, 256, (key.batch, size, size, 3), dtype=np.uint8)
        return measure(model, images, key, baselines=others, budget=budget).to_dict()
    finally:
        torch.set_num_threads(before)


def _measure_on_ray(
    model_uri: str, baselines: list[str], key: CalibrationKey, resources: dict[str, Any]
) -> dict[str, Any]:
    """``measure_in_place`` as one Ray task with the resources of one Predictor actor (its GPU, its CPUs)."""
    import ray

    remote: Any = ray.remote(cast(Any, measure_in_place))  # Ray's stubs do not type keyword-only arguments
    task = remote.options(
        num_gpus=resources.get("num_gpus") or 0, num_cpus=resources.get("num_cpus") or 1, max_retries=1
    )
    return dict(ray.get(task.remote(model_uri, baselines, key, threads=resources.get("threads"))))


def ensure(cfg: TagJobConfig, key: CalibrationKey, resources: dict[str, Any]) -> RunCalibration:
    """The stored calibration of ``key``; measured (and stored) when there is none or ``cfg.recalibrate``."""
    t0 = time.perf_counter()
    uri = record_uri(cfg.output, key)
    if not cfg.recalibrate:
        stored = load(cfg.output, cfg.storage_options, key)
        if stored is not None:
            log.info("reusing the calibration %s (measured %s)", redact(uri), stored.measured_at)
            return RunCalibration(stored, reused=True, uri=uri, seconds=time.perf_counter() - t0)
    log.info("calibrating %s on %s, batch %d (once per model, device and batch size)", key.model_version,
             key.device, key.batch)  # fmt: skip
    if resources.get("executor") == "ray":
        data = _measure_on_ray(cfg.model, cfg.baseline, key, resources)
    else:
        data = measure_in_place(cfg.model, cfg.baseline, key, threads=resources.get("threads"))
    cal = Calibration.from_dict(data)
    write_json(uri, cal.to_dict(), cfg.storage_options)
    return RunCalibration(cal, reused=False, uri=uri, seconds=time.perf_counter() - t0)
