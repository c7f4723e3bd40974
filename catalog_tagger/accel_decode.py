"""Batched JPEG decode + EXIF orientation + resize on a torch device: nvJPEG on CUDA, libjpeg-turbo on CPU.

The accelerator path of the predict stage: the reader only fetches bytes (and reads the header), and the
Predictor decodes a whole batch of JPEGs here, on its GPU, to the same ``size x size`` uint8 HWC layout as
``decode.decode_image``. Anything this path cannot decode the same way Pillow would (other formats, CMYK,
RGB-coded or truncated JPEGs, whatever the device decoder refuses) gets a reason and a zero row: the caller
decodes those with ``decode.decode_image`` (Pillow), so every image keeps exactly one ok-or-error row.

Differences from the Pillow path, by design: the device decodes at full resolution (no DCT draft scaling) and
resizes with an antialiased bilinear filter, so pixels differ by a few levels, not labels (see the tests).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

log = logging.getLogger(__name__)

# Decoded pixels held at once (about 3 bytes each, ~400 MB): a batch is decoded in chunks under this, so a batch
# of large photos never holds more than one chunk at full resolution. One image over it is decoded alone.
DEFAULT_CHUNK_PIXELS = 128 * 1024 * 1024
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not installed here); the warning is
# raised on every call, from torchvision's own module. Only that one message is silenced.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
    module="torchvision.io.image",
)
_EOI = b"\xff\xd9"
_EOI_WITHIN = 16  # the end-of-image marker may be followed by a few padding bytes


def decode_jpegs(
    datas: Sequence[bytes],
    orientations: Sequence[int],
    size: int,
    device: torch.device,
    *,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
) -> tuple[torch.Tensor, list[str | None]]:
    """Decode a batch of JPEG byte strings on ``device``: (uint8 tensor (B, size, size, 3) on ``device``, per
    image None or the reason it was not decoded here). Rows with a reason are zeros; the caller decodes them with
    Pillow and replaces them. Never raises for bad bytes.

    ``orientations`` are the EXIF codes (1-8) the reader took from each header; any other value means upright.
    The caller has already refused images over the pixel budget: no bomb check here. A chunk of images totalling
    at most ``chunk_pixels`` decoded pixels is decoded at once (nvJPEG's batched decode on CUDA), resized, and
    dropped before the next.
    """
    if len(datas) != len(orientations):
        raise ValueError(f"decode_jpegs: {len(datas)} images but {len(orientations)} orientations")
    out = torch.zeros((len(datas), size, size, 3), dtype=torch.uint8, device=device)
    reasons: list[str | None] = [None] * len(datas)
    pixels: dict[int, int] = {}
    for i, data in enumerate(datas):
        reason, pixels[i] = _screen(data)
        reasons[i] = reason
    todo = [i for i in range(len(datas)) if reasons[i] is None]
    for chunk in _chunks(todo, pixels, chunk_pixels):
        decoded = _decode_chunk([datas[i] for i in chunk], device)
        for i, image in zip(chunk, decoded, strict=True):
            if isinstance(image, str):
                reasons[i] = image
            else:
                out[i] = apply_orientation(_resize(image, size), orientations[i]).permute(1, 2, 0)
        del decoded  # the chunk's full-size images go before the next chunk is decoded
    fallbacks = sum(r is not None for r in reasons)
    if fallbacks:
        log.debug("decode_jpegs: %d of %d images left to Pillow", fallbacks, len(datas))
    return out, reasons


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` (..., H, W) turned upright for EXIF ``orientation``, exactly as Pillow's transpose does in
    ``decode.load_rgb`` (``decode._TRANSPOSE``: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
    clockwise, 7 transverse, 8 rotate 90 counter-clockwise); any other code returns ``image`` unchanged."""
    h, w = image.dim() - 2, image.dim() - 1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h, w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:
        return image.transpose(h, w)
    if orientation == 6:
        return image.rot90(-1, (h, w))
    if orientation == 7:
        return image.transpose(h, w).flip(h, w)
    if orientation == 8:
        return image.rot90(1, (h, w))
    return image


def _screen(data: bytes) -> tuple[str | None, int]:
    """(None, decoded pixels) for a JPEG the device decodes as Pillow would; (reason, 0) for one left to Pillow.

    From the header alone (Pillow parses it lazily, no pixel is decoded). Refused: non-JPEGs; CMYK/YCCK (Pillow
    inverts Adobe CMYK; nvJPEG's RGB output is not known to match); RGB-coded JPEGs (Adobe transform 0: no
    YCbCr to undo); and bytes without an end-of-image marker at their end, which are truncated (Pillow refuses
    them) or carry a trailer (rare): a decoder that fills missing blocks with grey must not tag those ok.
    """
    if not data:
        return "empty file (0 bytes)", 0
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
            transform = img.info.get("adobe_transform")
    except Exception as err:  # noqa: BLE001 - hostile bytes may raise anything; each becomes a reason
        return f"unreadable image header: {type(err).__name__}: {err}", 0
    if fmt != "JPEG":
        return f"not a JPEG ({fmt}): decoded by Pillow", 0
    if mode not in ("RGB", "L"):
        return f"{mode} JPEG: colour conversion left to Pillow", 0
    if mode == "RGB" and transform == 0:
        return "RGB-coded JPEG (Adobe transform 0): colour conversion left to Pillow", 0
    if data.find(_EOI, len(data) - _EOI_WITHIN) < 0:
        return "no end-of-image marker at the end of the JPEG (truncated?): left to Pillow", 0
    return None, width * height


def _chunks(indices: list[int], pixels: dict[int, int], budget: int) -> Iterator[list[int]]:
    """``indices`` in order, grouped so that each group's decoded pixels stay within ``budget`` (a group holds at
    least one image)."""
    chunk: list[int] = []
    total = 0
    for i in indices:
        if chunk and total + pixels[i] > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += pixels[i]
    if chunk:
        yield chunk


def _decode_chunk(datas: list[bytes], device: torch.device) -> list[torch.Tensor | str]:
    """Each JPEG decoded to (3, H, W) uint8 on ``device``, or the reason it failed. One batched call (nvJPEG's
    batched decode on CUDA); only when that raises, image by image, so that one bad image never costs the others
    the device path."""
    # A copy into a writable buffer: torch.frombuffer warns on read-only bytes (the decoder never writes to it).
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        images: list[torch.Tensor] = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:  # torch's C++ errors (and CUDA out-of-memory) arrive as RuntimeError
        log.debug("batched JPEG decode of %d images failed (%s); decoding them one by one", len(datas), err)
        return [_decode_one(tensor, device) for tensor in encoded]
    return [_checked(image) for image in images]


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | str:
    """One JPEG decoded on ``device``, or the reason it failed."""
    try:
        image: torch.Tensor = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        return f"device JPEG decode failed: {_message(err)}"
    return _checked(image)


def _checked(image: torch.Tensor) -> torch.Tensor | str:
    """``image`` if it is (3, H, W) with pixels, else a reason (a defensive check on the decoder's output)."""
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        return f"device JPEG decode gave shape {tuple(image.shape)}, not (3, H, W)"
    return image


def _message(err: Exception) -> str:
    """The first line of a torch C++ error, without torchvision's location prefix (``decode_jpeg, file:line, ``)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    parts = text.split(", ", 2)
    return parts[2] if text.startswith("decode_jpeg, ") and len(parts) == 3 else text


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8, squashed to a square like ``decode.decode_image``, and through the
    same two steps as its Pillow path, so that the model sees what it was trained on (``train/data.py`` decodes
    with ``decode_image``): first the reduction JPEG draft mode makes (Pillow decodes at 1/8, 1/4 or 1/2 scale,
    the largest that keeps both sides at least ``size``; a scaled IDCT is close to averaging s x s blocks, so a
    box average here), then an antialiased bilinear resize (what Pillow's BILINEAR does when it shrinks). In
    float32 (CUDA has no uint8 interpolate), rounded back. Orientation is applied after it: resizing to a square
    commutes with flips and transposes."""
    if image.shape[1:] == (size, size):
        return image
    x = image.unsqueeze(0).to(torch.float32)
    scale = _draft_scale(image.shape[2], image.shape[1], size)
    if scale > 1:  # ceil_mode: the last partial block is averaged too, as Pillow's draft size rounds up
        x = F.avg_pool2d(x, scale, ceil_mode=True)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)


def _draft_scale(width: int, height: int, size: int) -> int:
    """The DCT scale Pillow's ``JpegImageFile.draft(mode, (size, size))`` picks: the largest of 8, 4, 2, 1 that is
    at most ``min(width // size, height // size)``."""
    most = min(width // size, height // size)
    return next(s for s in (8, 4, 2, 1) if most >= s)
