"""The read + decode stage (CPU): uri rows -> bytes -> fixed-size uint8 arrays, failures as error rows.

On the accelerator path (``accelerator_jpeg``) this stage only reads: JPEGs an accelerator decodes pass on as
bytes, their header checked (pixel budget, truncation) and their EXIF orientation read, for the Predictor to decode
on its device (``accel_decode.py``); every other image is decoded here as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_tagger.decode import DEFAULT_MAX_PIXELS, content_hash, decode_image, probe
from catalog_tagger.errors import DecodeError, ReadRefused
from catalog_tagger.fetch import ReadLimits, read_bounded
from catalog_tagger.schema import DECODE_COL, STATUS_ERROR, STATUS_OK, STATUS_UNCHANGED
from catalog_tagger.storage import redact, with_userinfo, within_root

READ_ATTEMPTS = 5
_KEPT = ("uri", "size", "etag", "mtime")  # listing columns carried through to the output rows


def read_with_retries(
    uri: str, storage_options: dict[str, Any] | None, limits: ReadLimits | None = None, attempts: int = READ_ATTEMPTS
) -> bytes:
    """Read an object's bytes within ``limits`` (size cap, timeouts, one deadline for every attempt), retrying
    transient store errors with jittered exponential backoff while the deadline allows."""
    return read_bounded(uri, storage_options, limits, attempts=attempts)


class _Decoded:
    """The stage's output columns for one batch of ``n`` images, filled row by row."""

    def __init__(self, n: int, image_size: int, *, jpeg: bool = False) -> None:
        self.images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
        # the accelerator path: JPEG bytes left for the Predictor to decode (None: decoded here, or an error)
        self.jpeg = np.full(n, None, dtype=object) if jpeg else None
        self.orientation = np.ones(n, dtype=np.int8)
        self.status = np.empty(n, dtype=object)
        self.error = np.empty(n, dtype=object)
        self.hashes = np.empty(n, dtype=object)
        self.width = np.zeros(n, dtype=np.int32)
        self.height = np.zeros(n, dtype=np.int32)
        self.decode_s = np.zeros(n, dtype=np.float64)

    def fail(self, i: int, reason: str) -> None:
        self.status[i], self.error[i] = STATUS_ERROR, reason[:500]

    def columns(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out = {c: np.asarray(batch.column(c).to_pylist(), dtype=object) for c in _KEPT}
        out.update(
            content_hash=self.hashes,
            status=self.status,
            error=self.error,
            width=self.width,
            height=self.height,
            image=self.images,
        )
        out[DECODE_COL] = self.decode_s
        if self.jpeg is not None:
            out.update(jpeg=self.jpeg, orientation=self.orientation)
        return out


@dataclass(frozen=True)
class DecodeStage:
    """Ray Data task (or a call in the local executor): one output row per input row, never an exception.

    A row whose bytes hash to the last committed row's ``prev_hash`` is marked unchanged (the sink skips it).
    """

    image_size: int
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # credentials: never in a repr
    allowed_root: str | None = None  # re-checked just before each read (a symlink may have changed since listing)
    # origin -> "user:password" taken out of the manifest's uris (sources.Listing): put back for the read only
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    limits: ReadLimits = field(default_factory=ReadLimits)  # size cap, timeouts and deadline of each image's read
    max_pixels: int = DEFAULT_MAX_PIXELS  # per-image pixel budget: a larger image is an error row, never decoded
    accelerator_jpeg: bool = False  # pass JPEGs on as bytes for the Predictor's device to decode

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        n = batch.num_rows
        uris = batch.column("uri").to_pylist()
        prev = batch.column("prev_hash").to_pylist() if "prev_hash" in batch.column_names else [None] * n
        out = _Decoded(n, self.image_size, jpeg=self.accelerator_jpeg)
        for i, uri in enumerate(uris):
            t0 = time.process_time()
            timed = self._one(out, i, uri, prev[i])
            if timed:
                out.decode_s[i] = time.process_time() - t0
        return out.columns(batch)

    def _one(self, out: _Decoded, i: int, uri: str, prev_hash: str | None) -> bool:
        """Read and decode row ``i`` into ``out``; False where no decode time is accounted (refused, unchanged)."""
        if self.allowed_root is not None and not within_root(uri, self.allowed_root):
            out.fail(i, f"read: refused: outside the allowed root {self.allowed_root}")
            return False
        try:
            data = read_with_retries(with_userinfo(uri, self.credentials), self.storage_options, self.limits)
        except ReadRefused as err:  # not a regular file, over the cap, past the deadline: the reason says which
            out.fail(i, f"read: {err}")
            return True
        except Exception as err:  # noqa: BLE001 - every failure becomes this image's error row
            out.fail(i, redact(f"read: {type(err).__name__}: {err}"))
            return True
        out.hashes[i] = content_hash(data)
        if prev_hash is not None and prev_hash == out.hashes[i]:
            out.status[i] = STATUS_UNCHANGED
            return False
        try:
            if out.jpeg is not None and self._pass_on(out, i, data):
                return True
            dec = decode_image(data, self.image_size, max_pixels=self.max_pixels)
        except DecodeError as err:
            out.fail(i, f"decode: {err}")
        else:
            out.images[i] = dec.array
            out.width[i], out.height[i] = dec.width, dec.height
            out.status[i] = STATUS_OK
        return True

    def _pass_on(self, out: _Decoded, i: int, data: bytes) -> bool:
        """The accelerator path: a JPEG its decoder takes is checked by its header and left as bytes (True);
        anything else is for Pillow, here (False). A header that fails the checks raises ``DecodeError``."""
        head = probe(data, max_pixels=self.max_pixels)
        if not head.accelerator_jpeg:
            return False
        assert out.jpeg is not None
        out.jpeg[i], out.orientation[i] = data, head.orientation
        out.width[i], out.height[i] = head.width, head.height
        out.status[i] = STATUS_OK
        return True
