"""The Predictor's decode step on the accelerator path: the batch's JPEG bytes are decoded together on the model's
device (``accel_decode.decode_jpegs``: nvJPEG on a GPU), any JPEG that decoder refuses goes through Pillow
(``decode.decode_image``, the CPU path's own function), and a row whose bytes no decoder takes becomes an error row
with the CPU path's reason. Rows the read stage decoded already (every other format) are used as they are.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from catalog_tagger.decode import DEFAULT_MAX_PIXELS, decode_image
from catalog_tagger.errors import DecodeError
from catalog_tagger.schema import DECODE_COL, STATUS_ERROR, STATUS_OK

if TYPE_CHECKING:
    import torch


def has_jpeg_bytes(batch: dict[str, np.ndarray]) -> bool:
    """Whether the read stage left JPEG bytes in this batch for the Predictor's device."""
    return "jpeg" in batch


def device_images(
    batch: dict[str, np.ndarray],
    ok: np.ndarray,
    *,
    size: int,
    device: torch.device,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, dict[str, np.ndarray], np.ndarray]:
    """(uint8 images (k, size, size, 3) on ``device``, the batch with failed rows made errors, the rows still ok).

    The CPU seconds this step spends (launching the device decode, Pillow fallbacks) are added to the rows'
    decode seconds, spread evenly over the JPEG rows.
    """
    import torch

    from catalog_tagger.accel_decode import decode_jpegs

    cpu0 = time.process_time()
    jpeg, status, error = batch["jpeg"], batch["status"].astype(object), batch["error"].astype(object)
    decode_s = np.asarray(batch[DECODE_COL], dtype=np.float64).copy()
    images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).to(device, non_blocking=True)
    picked = [k for k, i in enumerate(ok) if jpeg[i] is not None]  # positions among the ok rows
    if picked:
        rows = ok[picked]
        decoded, failures = decode_jpegs(
            [jpeg[i] for i in rows], [int(batch["orientation"][i]) for i in rows], size, device
        )
        images[picked] = decoded
        for k, i, reason in zip(picked, rows, failures, strict=True):
            if reason is None:
                continue
            try:  # the device's decoder refused it: Pillow, exactly as the CPU path decodes
                images[k] = torch.from_numpy(decode_image(jpeg[i], size, max_pixels=max_pixels).array).to(device)
            except DecodeError as err:
                status[i], error[i] = STATUS_ERROR, f"decode: {err}"[:500]
        decode_s[rows] += (time.process_time() - cpu0) / len(rows)
    keep = status[ok] == STATUS_OK
    out = {**batch, "status": status, "error": error, DECODE_COL: decode_s}
    return images[torch.from_numpy(keep).to(device)], out, ok[keep]
