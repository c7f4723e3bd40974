"""The predict stage: the Predictor actor loads the model once and maps decoded batches to output rows."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog_tagger.kinds import kind_of
from catalog_tagger.schema import ACCEL_COL, DECODE_COL, STATUS_ERROR, STATUS_OK, output_schema
from catalog_tagger.tag.device_images import device_images, has_jpeg_bytes

if TYPE_CHECKING:
    import torch

    from catalog_tagger.model.multihead import ModelOutput

log = logging.getLogger(__name__)

# Test-only fault injection (see FaultInjection): read by the DRIVER and passed to the actors' constructor, since
# variables set in a test process after Ray started never reach Ray's worker processes.
ENV_KILL_AT_BATCH = "CATALOG_TAGGER_TEST_KILL_ACTOR_AT_BATCH"
ENV_KILL_MARKER = "CATALOG_TAGGER_TEST_KILL_MARKER"
ENV_BATCH_DELAY_S = "CATALOG_TAGGER_TEST_BATCH_DELAY_S"

_PASSED = ("uri", "size", "etag", "mtime", "content_hash", "error")  # decode-stage columns copied as they are


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

    def apply(self, batch: int) -> None:
        """Sleep, then exit hard if this is the batch to die at (the first actor to reach it, once per marker)."""
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)
        if not self.kill_at_batch or batch != self.kill_at_batch:
            return
        if self.kill_marker:
            try:
                fd = os.open(self.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
        log.warning("test fault injection: predictor exits hard at batch %d", batch)
        os._exit(13)


def check_same_model(model_uri: str, expected: str | None, found: str) -> None:
    """Refuse an artifact that changed since the run validated it (a model promoted into the nightly's ``current``
    folder mid-run, then a Predictor started or restarted): one run's rows never mix two models."""
    if expected is not None and found != expected:
        from catalog_tagger.errors import ArtifactError
        from catalog_tagger.storage import redact

        raise ArtifactError(
            f"model {redact(model_uri)} changed during the run: the run started with version {expected}, the "
            f"artifact is now {found} (promoted meanwhile?); rows of two models would mix. Its written files are "
            "kept; start a new run (without --run-id) to tag with the new model"
        )


class Predictor:
    """Ray Data actor (or one instance in the local executor): loads the model once, maps decoded batches to
    output rows in the final schema, plus the per-row seconds the writer sums for the savings report (the
    single-task counterfactual is the run's stored calibration, ``tag/calibrate.py``, applied at the commit)."""

    def __init__(
        self,
        model_uri: str,
        *,
        run_id: str,
        tagged_at: datetime,
        device: str = "auto",
        threads: int | None = None,
        faults: FaultInjection | None = None,
        model_version: str | None = None,
    ) -> None:
        import torch

        from catalog_tagger.model.artifact import load_artifact
        from catalog_tagger.model.inference import prepare_for_inference, select_device

        if threads:
            torch.set_num_threads(threads)
        self.device = select_device(device)
        model, self.card = load_artifact(model_uri, map_location="cpu")
        check_same_model(model_uri, model_version, self.card.version)
        self.model = prepare_for_inference(model, self.device)
        self.tasks = self.card.task_config()
        self.schema = output_schema(self.tasks, self.card.embedding_dim)
        self.run_id = run_id
        self.tagged_at = tagged_at
        self.batches = 0
        self.faults = faults if faults is not None else FaultInjection.from_env()
        log.info("predictor on %s (torch threads %d)", self.device, torch.get_num_threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from catalog_tagger.model.inference import output_columns, run_batch

        self.batches += 1
        if self.faults is not None:
            self.faults.apply(self.batches)
        status = batch["status"]
        ok = np.flatnonzero(status == STATUS_OK)
        accel_s = 0.0
        cols: dict[str, Any] = {}
        images: np.ndarray | torch.Tensor
        if len(ok) and has_jpeg_bytes(batch):  # the accelerator path: decode the JPEGs on the model's device
            images, batch, ok = device_images(batch, ok, size=self.card.image_size, device=self.device)
        elif len(ok):
            images = np.ascontiguousarray(batch["image"][ok])
        if len(ok):
            timed = run_batch(self.model, images)
            accel_s = timed.seconds
            cols = output_columns(self.card, timed.output)
            batch = _flag_nonfinite(batch, ok, timed.output)
        return self._to_table(batch, ok, cols, len(status), accel_s)

    def _to_table(
        self,
        batch: dict[str, np.ndarray],
        ok: np.ndarray,
        cols: dict[str, Any],
        n: int,
        accel_s: float,
    ) -> pa.Table:
        """One row per input row: error rows keep their reason and get nulls for every prediction."""
        pos = np.full(n, -1, dtype=np.int64)  # row -> index among the ok rows (-1: not predicted)
        pos[ok] = np.arange(len(ok))
        pos[batch["status"] != STATUS_OK] = -1  # rows flagged after the forward pass (non-finite output)
        data = self._row_columns(batch, n)
        for task in self.tasks.tasks:
            for fld in kind_of(task).fields(task):
                values = cols.get(fld.name)
                data[fld.name] = [None] * n if values is None else _spread([_plain(v) for v in values], pos)
        arrays = []
        for fld in self.schema:
            if fld.name == "embedding":
                arrays.append(self._embeddings(cols, ok, pos))
            elif fld.name == "tagged_at":
                arrays.append(pa.array([self.tagged_at] * n, type=fld.type))
            else:
                arrays.append(pa.array(data[fld.name], type=fld.type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        # Per-row share of this batch's busy time: the sink sums them (rows may arrive in any order).
        share = np.full(n, accel_s / n if n else 0.0)
        table = table.append_column(ACCEL_COL, pa.array(share))
        return table.append_column(DECODE_COL, pa.array(batch[DECODE_COL].astype(np.float64)))

    def _row_columns(self, batch: dict[str, np.ndarray], n: int) -> dict[str, list[Any]]:
        """The output's base columns (everything but the predictions) from the decode stage's batch."""
        data = {c: _clean(batch[c]) for c in _PASSED}
        status = batch["status"]
        data.update(
            run_id=[self.run_id] * n,
            model_version=[self.card.version] * n,
            status=status.tolist(),
            width=[int(w) if s == STATUS_OK else None for w, s in zip(batch["width"], status, strict=True)],
            height=[int(h) if s == STATUS_OK else None for h, s in zip(batch["height"], status, strict=True)],
        )
        return data

    def _embeddings(self, cols: dict[str, Any], ok: np.ndarray, pos: np.ndarray) -> pa.Array:
        dim = self.card.embedding_dim
        n = len(pos)
        if not cols:
            return pa.nulls(n, type=pa.list_(pa.float32(), dim))
        flat = np.zeros((n, dim), dtype=np.float32)
        flat[ok] = cols["embedding"]
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=pa.array(pos < 0))


def _flag_nonfinite(batch: dict[str, np.ndarray], ok: np.ndarray, output: ModelOutput) -> dict[str, np.ndarray]:
    """The batch with rows whose model output is NaN or inf turned into error rows (never ``ok`` with NaN scores)."""
    from catalog_tagger.model.inference import NONFINITE_ERROR, finite_rows

    bad = ok[~finite_rows(output)]
    if not bad.size:
        return batch
    log.warning("%d row(s) of a batch: %s", bad.size, NONFINITE_ERROR)
    status, error = batch["status"].astype(object), batch["error"].astype(object)
    status[bad], error[bad] = STATUS_ERROR, NONFINITE_ERROR
    return {**batch, "status": status, "error": error}


def _clean(values: np.ndarray) -> list[Any]:
    """Ray's numpy batches turn nulls of object columns into NaN floats; the schema wants nulls."""
    return [None if (v is None or (isinstance(v, float) and v != v)) else v for v in values.tolist()]


def _plain(value: Any) -> Any:
    """A per-row prediction as Arrow takes it (a multilabel row's scores arrive as a numpy array)."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def _spread(values: list[Any], pos: np.ndarray) -> list[Any]:
    """Values of the ok rows placed at their rows; None at the others."""
    return [values[p] if p >= 0 else None for p in pos]
