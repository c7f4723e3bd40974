"""The read + decode stage (CPU): uri rows -> bytes -> fixed-size uint8 arrays, failures as error rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_tagger.decode import content_hash, decode_image
from catalog_tagger.errors import DecodeError
from catalog_tagger.schema import DECODE_COL, STATUS_ERROR, STATUS_OK, STATUS_UNCHANGED
from catalog_tagger.storage import filesystem, retry_transient, strip, within_root

READ_ATTEMPTS = 5
_KEPT = ("uri", "size", "etag", "mtime")  # listing columns carried through to the output rows


def read_with_retries(uri: str, storage_options: dict[str, Any] | None, attempts: int = READ_ATTEMPTS) -> bytes:
    """Read an object's bytes, retrying transient store errors with jittered exponential backoff."""
    fs = filesystem(uri, storage_options)
    data: bytes = retry_transient(lambda: fs.cat_file(strip(uri)), f"read {uri}", attempts=attempts)
    return data


class _Decoded:
    """The stage's output columns for one batch of ``n`` images, filled row by row."""

    def __init__(self, n: int, image_size: int) -> None:
        self.images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
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
        return out


@dataclass(frozen=True)
class DecodeStage:
    """Ray Data task (or a call in the local executor): one output row per input row, never an exception.

    A row whose bytes hash to the last committed row's ``prev_hash`` is marked unchanged (the sink skips it).
    """

    image_size: int
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # credentials: never in a repr
    allowed_root: str | None = None  # re-checked just before each read (a symlink may have changed since listing)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        n = batch.num_rows
        uris = batch.column("uri").to_pylist()
        prev = batch.column("prev_hash").to_pylist() if "prev_hash" in batch.column_names else [None] * n
        out = _Decoded(n, self.image_size)
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
            data = read_with_retries(uri, self.storage_options)
        except Exception as err:  # noqa: BLE001 - every failure becomes this image's error row
            out.fail(i, f"read: {type(err).__name__}: {err}")
            return True
        out.hashes[i] = content_hash(data)
        if prev_hash is not None and prev_hash == out.hashes[i]:
            out.status[i] = STATUS_UNCHANGED
            return False
        try:
            dec = decode_image(data, self.image_size)
        except DecodeError as err:
            out.fail(i, f"decode: {err}")
        else:
            out.images[i] = dec.array
            out.width[i], out.height[i] = dec.width, dec.height
            out.status[i] = STATUS_OK
        return True
