"""Ray Data stages: read + decode (CPU tasks) and the Predictor actor (one accelerator each, CPU fallback)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_tagger.decode import content_hash, decode_image
from catalog_tagger.errors import DecodeError
from catalog_tagger.schema import STATUS_ERROR, STATUS_OK, output_schema
from catalog_tagger.storage import filesystem, retry_transient, strip, within_root

log = logging.getLogger(__name__)

STATUS_UNCHANGED = "unchanged"  # internal: same bytes as the last committed row; never written
# Internal columns the driver sums for the run's accounting and drops before writing.
ACCEL_COL = "_accel_s"
DECODE_COL = "_decode_s"
CALIB_COL = "_single_task_s"

READ_ATTEMPTS = 5

# Test-only fault injection (see FaultInjection): read by the DRIVER and passed to the actors' constructor, since
# variables set in a test process after Ray started never reach Ray's worker processes.
ENV_KILL_AT_BATCH = "CATALOG_TAGGER_TEST_KILL_ACTOR_AT_BATCH"
ENV_KILL_MARKER = "CATALOG_TAGGER_TEST_KILL_MARKER"
ENV_BATCH_DELAY_S = "CATALOG_TAGGER_TEST_BATCH_DELAY_S"


def read_with_retries(uri: str, storage_options: dict[str, Any] | None, attempts: int = READ_ATTEMPTS) -> bytes:
    """Read an object's bytes, retrying transient store errors with jittered exponential backoff."""
    fs = filesystem(uri, storage_options)
    return retry_transient(lambda: fs.cat_file(strip(uri)), f"read {uri}", attempts=attempts)


@dataclass(frozen=True)
class FaultInjection:
    """Test-only faults for a Predictor: ``os._exit`` at batch k (once per marker file), or a sleep per batch."""

    kill_at_batch: int = 0  # 0: never
    kill_marker: str | None = None  # O_EXCL-created on the first kill, so a restarted actor does not die again
    batch_delay_s: float = 0.0  # slow every batch down (lets a test kill the driver mid-run)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FaultInjection | None:
        env = os.environ if env is None else env
        faults = cls(
            kill_at_batch=int(env.get(ENV_KILL_AT_BATCH, "0") or 0),
            kill_marker=env.get(ENV_KILL_MARKER) or None,
            batch_delay_s=float(env.get(ENV_BATCH_DELAY_S, "0") or 0),
        )
        return faults if faults.kill_at_batch or faults.batch_delay_s else None


@dataclass(frozen=True)
class DecodeStage:
    """Ray Data task: uri rows -> bytes -> uint8 arrays, one row per input, failures as error rows."""

    image_size: int
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # credentials: never in a repr
    allowed_root: str | None = None  # re-checked just before each read (a symlink may have changed since listing)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        n = batch.num_rows
        uris = batch.column("uri").to_pylist()
        prev = batch.column("prev_hash").to_pylist() if "prev_hash" in batch.column_names else [None] * n
        images = np.zeros((n, self.image_size, self.image_size, 3), dtype=np.uint8)
        status = np.empty(n, dtype=object)
        error = np.empty(n, dtype=object)
        hashes = np.empty(n, dtype=object)
        width = np.zeros(n, dtype=np.int32)
        height = np.zeros(n, dtype=np.int32)
        decode_s = np.zeros(n, dtype=np.float64)
        for i, uri in enumerate(uris):
            t0 = time.process_time()
            if self.allowed_root is not None and not within_root(uri, self.allowed_root):
                status[i], error[i] = STATUS_ERROR, f"read: refused: outside the allowed root {self.allowed_root}"
                continue
            try:
                data = read_with_retries(uri, self.storage_options)
            except Exception as err:  # noqa: BLE001 - every failure becomes this image's error row
                status[i], error[i] = STATUS_ERROR, f"read: {type(err).__name__}: {err}"[:500]
                decode_s[i] = time.process_time() - t0
                continue
            hashes[i] = content_hash(data)
            if prev[i] is not None and prev[i] == hashes[i]:
                status[i] = STATUS_UNCHANGED
                continue
            try:
                dec = decode_image(data, self.image_size)
            except DecodeError as err:
                status[i], error[i] = STATUS_ERROR, f"decode: {err}"[:500]
            else:
                images[i] = dec.array
                width[i], height[i] = dec.width, dec.height
                status[i] = STATUS_OK
            decode_s[i] = time.process_time() - t0
        out: dict[str, np.ndarray] = {
            c: np.asarray(batch.column(c).to_pylist(), dtype=object) for c in ("uri", "size", "etag", "mtime")
        }
        out.update(
            content_hash=hashes,
            status=status,
            error=error,
            width=width,
            height=height,
            image=images,
        )
        out[DECODE_COL] = decode_s
        return out


class Predictor:
    """Ray Data actor: loads the model once, maps decoded batches to output rows in the final schema."""

    def __init__(
        self,
        model_uri: str,
        *,
        run_id: str,
        tagged_at: datetime,
        device: str = "auto",
        storage_options: dict[str, Any] | None = None,
        calibrate: bool = True,
        threads: int | None = None,
        faults: FaultInjection | None = None,
        baselines: list[str] | None = None,
    ) -> None:
        import torch

        from catalog_tagger.model.artifact import load_artifact
        from catalog_tagger.model.inference import prepare_for_inference, select_device

        if threads:
            torch.set_num_threads(threads)
        self.device = select_device(device)
        model, self.card = load_artifact(model_uri, map_location="cpu")
        self.model = prepare_for_inference(model, self.device)
        self.tasks = self.card.task_config()
        self.schema = output_schema(self.tasks, self.card.embedding_dim)
        self.run_id = run_id
        self.tagged_at = tagged_at
        self.batches = 0
        self.faults = faults if faults is not None else FaultInjection.from_env()
        self.calibration: dict[str, float] | None = None
        self.calibrate = calibrate
        # The user's own single-task artifacts (``--baseline``): timed instead of the backbone + one head.
        self.baselines = [
            prepare_for_inference(load_artifact(u, map_location="cpu")[0], self.device) for u in baselines or []
        ]
        log.info("predictor on %s (torch threads %d)", self.device, torch.get_num_threads())

    def _maybe_fault(self) -> None:
        # Test-only fault injection: the first actor to reach batch k exits hard, once per marker file.
        f = self.faults
        if f is None:
            return
        if f.batch_delay_s:
            time.sleep(f.batch_delay_s)
        if not f.kill_at_batch or self.batches != f.kill_at_batch:
            return
        marker = f.kill_marker
        if marker:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
        log.warning("test fault injection: predictor exits hard at batch %d", self.batches)
        os._exit(13)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from catalog_tagger.model.inference import output_columns, run_batch

        self.batches += 1
        self._maybe_fault()
        status = batch["status"]
        n = len(status)
        ok = np.flatnonzero(status == STATUS_OK)
        accel_s = 0.0
        single_s = 0.0
        cols: dict[str, Any] = {}
        if len(ok):
            images = np.ascontiguousarray(batch["image"][ok])
            if self.calibrate and self.calibration is None and self.baselines:
                from catalog_tagger import accounting

                cal = accounting.calibrate_baselines(
                    self.model,
                    self.baselines,
                    images[: accounting.PREDICTOR_CALIBRATION_IMAGES],
                    repeats=accounting.PREDICTOR_CALIBRATION_REPEATS,
                    warmup=accounting.PREDICTOR_CALIBRATION_WARMUP,
                )
                self.calibration = {**cal, "factor": cal["single_over_multi"]}
            if self.calibrate and self.calibration is None:
                from catalog_tagger import accounting

                self.calibration = accounting.calibrate_single_task(
                    self.model,
                    images[: accounting.PREDICTOR_CALIBRATION_IMAGES],
                    repeats=accounting.PREDICTOR_CALIBRATION_REPEATS,
                    warmup=accounting.PREDICTOR_CALIBRATION_WARMUP,
                )
            timed = run_batch(self.model, images)
            accel_s = timed.seconds
            cols = output_columns(self.card, timed.output)
            if self.calibration is not None:
                factor = self.calibration.get("factor", self.calibration["single_over_multi"] * len(self.tasks.tasks))
                single_s = accel_s * factor
        return self._to_table(batch, ok, cols, n, accel_s, single_s)

    def _to_table(
        self,
        batch: dict[str, np.ndarray],
        ok: np.ndarray,
        cols: dict[str, Any],
        n: int,
        accel_s: float,
        single_s: float,
    ) -> pa.Table:
        pos = np.full(n, -1, dtype=np.int64)
        pos[ok] = np.arange(len(ok))

        def clean(values: np.ndarray) -> list[Any]:
            # Ray's numpy batches turn nulls of object columns into NaN floats; the schema wants nulls.
            return [None if (v is None or (isinstance(v, float) and v != v)) else v for v in values.tolist()]

        def spread(values: Any) -> list[Any]:
            return [values[p] if p >= 0 else None for p in pos]

        data: dict[str, Any] = {
            "uri": clean(batch["uri"]),
            "size": clean(batch["size"]),
            "etag": clean(batch["etag"]),
            "mtime": clean(batch["mtime"]),
            "content_hash": clean(batch["content_hash"]),
            "run_id": [self.run_id] * n,
            "model_version": [self.card.version] * n,
            "status": batch["status"].tolist(),
            "error": clean(batch["error"]),
            "width": [int(w) if s == STATUS_OK else None for w, s in zip(batch["width"], batch["status"], strict=True)],
            "height": [
                int(h) if s == STATUS_OK else None for h, s in zip(batch["height"], batch["status"], strict=True)
            ],
        }
        for task in self.tasks.tasks:
            if task.kind == "multiclass":
                data[task.name] = spread(cols[task.name]) if cols else [None] * n
                data[f"{task.name}_score"] = spread(cols[f"{task.name}_score"]) if cols else [None] * n
            else:
                data[task.name] = spread(cols[task.name]) if cols else [None] * n
                scores = cols.get(f"{task.name}_scores") if cols else None
                data[f"{task.name}_scores"] = spread([s.tolist() for s in scores]) if scores is not None else [None] * n
        dim = self.card.embedding_dim
        emb_type = pa.list_(pa.float32(), dim)
        if cols:
            flat = np.zeros((n, dim), dtype=np.float32)
            flat[ok] = cols["embedding"]
            mask = pos < 0
            emb = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(mask))
        else:
            emb = pa.nulls(n, type=emb_type)
        arrays = []
        for fld in self.schema:
            if fld.name == "embedding":
                arrays.append(emb)
            elif fld.name == "tagged_at":
                arrays.append(pa.array([self.tagged_at] * n, type=fld.type))
            else:
                arrays.append(pa.array(data[fld.name], type=fld.type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        # Per-row share of this batch's busy time: the driver sums them (rows may arrive in any order).
        share = np.full(n, accel_s / n if n else 0.0)
        single = np.full(n, single_s / n if n else 0.0)
        table = table.append_column(ACCEL_COL, pa.array(share)).append_column(CALIB_COL, pa.array(single))
        return table.append_column(DECODE_COL, pa.array(batch[DECODE_COL].astype(np.float64)))
