"""The CPU decoders bench/decode.py compares: each turns image bytes into the model's size x size uint8 RGB array."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BASELINE = "pillow-draft"
# What catalog_tagger.decode.decode_image uses per format: Pillow (draft for JPEGs) everywhere.
USED = {"jpeg": BASELINE, "png": BASELINE, "webp": BASELINE}
# Why a decoder may not be adopted, in the table (the notes say more: see NOTES).
_TORCH_IN_DECODE = "torch in the decode stage"
_OPENCV_SIZE = "~150 MB dependency"
NOTES = (
    "not eligible: torchvision would import torch into the decode stage (~7 CPU-s per Ray worker, issue 14 item "
    "4); opencv-python-headless is ~150 MB installed (limit ~60 MB). simplejpeg (1.1 MB) is eligible but not a "
    "dependency: adopted only at >= 1.2x"
)


@dataclass(frozen=True)
class Decoder:
    """One candidate: its name, the formats it is timed on, the decode, and why the library may not use it."""

    name: str
    formats: tuple[str, ...]
    decode: Callable[[bytes, int], np.ndarray]
    barred: str = ""  # "" = the library could adopt it

    def eligible(self) -> bool:
        return not self.barred


def _pillow_draft(data: bytes, size: int) -> np.ndarray:
    from catalog_tagger.decode import decode_image

    return decode_image(data, size).array


def _simplejpeg(data: bytes, size: int) -> np.ndarray:
    """simplejpeg (libjpeg-turbo's TurboJPEG API, one call over the whole buffer) asked for at least the size
    Pillow's draft picks, so it takes the same DCT scale and yields the same pixels; Pillow reads the header (size,
    EXIF orientation) and resizes, as decode_image would around it. RGB and greyscale JPEGs only."""
    import simplejpeg
    from PIL import Image

    from catalog_tagger.decode import _TRANSPOSE

    with Image.open(io.BytesIO(data)) as probe:
        if probe.mode not in ("RGB", "L"):
            raise ValueError(f"{probe.mode} JPEGs stay with Pillow")
        orientation = int(probe.getexif().get(0x0112, 1) or 1)
        probe.draft("RGB", (size, size))
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=probe.height, min_width=probe.width, strict=True)
    img = Image.fromarray(arr)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.uint8)


def _pillow_full(data: bytes, size: int) -> np.ndarray:
    from catalog_tagger.decode import decode_full

    return decode_full(data, size)


def _torchvision(data: bytes, size: int) -> np.ndarray:
    """torchvision.io.decode_image (libjpeg-turbo, libpng, libwebp; full size, EXIF applied) + antialiased
    bilinear interpolate: the all-torch path a GPU pipeline would use, here on the CPU."""
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    chw = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB, True)
    out = torch.nn.functional.interpolate(
        chw[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _opencv(data: bytes, size: int) -> np.ndarray:
    """cv2.imdecode at the DCT scale Pillow's draft would take (IMREAD_REDUCED_COLOR_2/4/8; EXIF applied by
    OpenCV), then Pillow's resize: only the decoder differs from the baseline."""
    import cv2
    from PIL import Image

    with Image.open(io.BytesIO(data)) as probe:
        factor = min(probe.width // size, probe.height // size) if probe.format == "JPEG" else 1
    reduced = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
    flag = next((f for s, f in reduced if factor >= s), cv2.IMREAD_COLOR)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if bgr is None:
        raise ValueError("opencv could not decode the image")
    rgb = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.uint8)


def candidates() -> tuple[list[Decoder], list[str]]:
    """The decoders installed here (baseline first), and a note for each one that is not."""
    every = ("jpeg", "png", "webp")
    found = [
        Decoder(BASELINE, every, _pillow_draft),
        Decoder("pillow-full", every, _pillow_full),
        Decoder("torchvision", every, _torchvision, _TORCH_IN_DECODE),
    ]
    notes = [NOTES]
    try:
        import simplejpeg  # noqa: F401 - only whether it is installed

        found.insert(1, Decoder("simplejpeg", ("jpeg",), _simplejpeg))
    except ImportError:
        notes.append("simplejpeg not measured (not installed; `pip install simplejpeg` to include it)")
    try:
        import cv2

        cv2.setNumThreads(1)  # one image per core, like the other decoders
        found.append(Decoder("opencv", every, _opencv, _OPENCV_SIZE))
    except ImportError:
        notes.append("opencv not measured (not installed; `pip install opencv-python-headless` to include it)")
    return found, notes
